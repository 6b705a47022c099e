"""evaluate.py, the command: metrics and statistics from folders and .npz files, one-line errors."""
import json
import os
import re

import numpy as np
import pytest
from helpers import fid_network_path, refuse_writes_in, run_main, run_script
from PIL import Image

from ditlib import metrics


@pytest.mark.slow  # three evaluate.py runs (one a process) and the spatial features: about 45 s on 2 cores
def test_cli_metrics_and_stats_from_a_folder(tmp_path, network, sets, features, capsys):
    digits = np.load(sets["half_b"])["arr_0"][:10]
    folder = tmp_path / "real"
    for i, digit in enumerate(digits):
        (folder / str(i % 3)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(digit, mode="L").save(folder / str(i % 3) / f"{i:03d}.png")
    np.savez(tmp_path / "samples.npz", arr_0=np.load(sets["half_a"])["arr_0"][:10])
    inception = ["--inception", fid_network_path()]
    run_main("evaluate.py", folder, "--save-stats", tmp_path / "ref.npz", *inception)
    assert "Wrote the statistics of 10 images" in capsys.readouterr().out
    result = run_script("evaluate.py", tmp_path / "samples.npz", tmp_path / "ref.npz", *inception, "--batch-size", "8")
    assert "warning: " + str(tmp_path / "samples.npz") + " holds 10 images; FID from fewer than 2,048" in result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    # The folder holds the first 10 of half_b (the PNG round trip is lossless), the npz the first 10 of half_a.
    expected = metrics.evaluate(*(metrics.statistics(features[k]["pool3"][:10]) | {"pool3": features[k]["pool3"][:10]}
                                   for k in ("half_a", "half_b")))
    assert float(lines["FID"]) == pytest.approx(expected["fid"], abs=1e-3)
    assert float(lines["Precision"]) == pytest.approx(expected["precision"], abs=1e-4)
    assert lines["Inception Score"].startswith("n/a")  # this network has no logits
    # sFID: the Frechet distance of the two sets' mixed_6/conv features, computed here from the images.
    spatial = [metrics.statistics(network(metrics.as_uint8_nchw(images, "test"))[2].numpy())
               for images in (np.load(sets["half_a"])["arr_0"][:10], digits)]
    assert float(lines["sFID"]) == pytest.approx(metrics.frechet_distance(*spatial), abs=1e-3)
    np.savez(tmp_path / "old.npz", **{k: v for k, v in np.load(tmp_path / "ref.npz").items() if not k.endswith("_s")})
    run_main("evaluate.py", tmp_path / "samples.npz", tmp_path / "old.npz", *inception)
    assert (f"sFID: n/a ({tmp_path / 'old.npz'} holds statistics without the spatial ones (mu_s, sigma_s); "
            f"write them again with --save-stats)") in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("no_arrays", "has neither images (arr_0) nor statistics"),
    ("float_images", "images must be uint8, got float32"),
    ("mixed_sizes", "pass --image-size"),
    ("bad_network", "holds neither TorchScript nor torch-fidelity"),
    ("missing", "no such file or folder"),
    ("one_image", "holds 1 image(s); FID needs at least 2 for a covariance"),
    ("one_image_hwc", "is ambiguous: one 8x8 image with 3 channels, or 8 grey images 8x3"),
    ("npy_named_npz", "holds a single array (an .npy file), not an .npz archive"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, sets, case, message):
    inputs = tmp_path / "input.npz"
    if case == "no_arrays":
        np.savez(inputs, labels=np.zeros(3))
    elif case == "float_images":
        np.savez(inputs, arr_0=np.zeros((3, 8, 8, 3), np.float32))
    elif case == "mixed_sizes":
        inputs = tmp_path / "folder"
        inputs.mkdir()
        for side in (8, 9):
            Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(inputs / f"{side}.png")
    elif case == "missing":
        inputs = tmp_path / "nothing.npz"
    elif case == "one_image":
        np.savez(inputs, arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    elif case == "one_image_hwc":  # read as 8 grey images 8x3 wide, it gave FID 347.6 and exit 0
        np.savez(inputs, arr_0=np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    elif case == "npy_named_npz":
        with open(inputs, "wb") as handle:
            np.save(handle, np.zeros((4, 8, 8, 3), np.uint8))
    network = fid_network_path()
    if case == "bad_network":
        network = tmp_path / "weights.pth"
        network.write_bytes(b"not weights")
        inputs = sets["half_a"]
    if case == "missing":  # what a user sees: one line, no traceback
        result = run_script("evaluate.py", inputs, sets["half_b"], "--inception", network, check=False)
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip().startswith("evaluate.py: error:") and len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(ValueError, match=re.escape(message)):
        run_main("evaluate.py", inputs, sets["half_b"], "--inception", network)


def test_save_stats_never_replaces_an_input(tmp_path, sets):
    """evaluate.py s.npz --save-stats s.npz (or onto the reference) would replace images by statistics."""
    samples = tmp_path / "s.npz"
    samples.write_bytes(sets["half_a"].read_bytes())
    before = samples.read_bytes()
    for argv in ([samples, "--save-stats", samples], [sets["half_b"], samples, "--save-stats", samples]):
        with pytest.raises(ValueError, match=f"--save-stats {re.escape(str(samples))} is an input of this command"):
            run_main("evaluate.py", *argv, "--inception", fid_network_path())
    assert samples.read_bytes() == before
    # Issue 34: nor an existing file that is not an input (another sample batch), without --overwrite.
    other = tmp_path / "other.npz"
    other.write_bytes(before)
    with pytest.raises(ValueError, match=f"--save-stats {re.escape(str(other))} exists; pass --overwrite"):
        run_main("evaluate.py", sets["half_b"], "--save-stats", other, "--inception", fid_network_path())
    assert other.read_bytes() == before
    run_main("evaluate.py", sets["half_b"], "--save-stats", other, "--overwrite", "--inception", fid_network_path())
    assert set(np.load(other).files) >= {"mu", "sigma"}


def test_json_never_replaces_an_input_or_a_file_that_is_not_a_record(tmp_path, sets):
    """Issue 34, second pass: --json onto the reference batch (or another batch) replaced its images
    with the metrics, exit 0. An earlier record is still replaced, as reproduce.py's reruns need."""
    samples, reference, other = tmp_path / "samples.npz", tmp_path / "ref.npz", tmp_path / "other.npz"
    np.savez(samples, arr_0=np.load(sets["half_a"])["arr_0"][:4])  # four a side (k=3 for recall): a second
    np.savez(reference, arr_0=np.load(sets["half_b"])["arr_0"][:4])
    other.write_bytes(reference.read_bytes())
    before = reference.read_bytes()
    common = [samples, reference, "--inception", fid_network_path()]
    with pytest.raises(ValueError, match=f"--json {re.escape(str(reference))} is an input of this command"):
        run_main("evaluate.py", *common, "--json", reference)
    with pytest.raises(ValueError, match=f"--json {re.escape(str(other))} exists and is not a JSON record"):
        run_main("evaluate.py", *common, "--json", other)
    assert reference.read_bytes() == other.read_bytes() == before
    record = tmp_path / "metrics.json"
    record.write_text('{"fid": 1.0}')
    run_main("evaluate.py", *common, "--json", record)
    assert json.loads(record.read_text())["fid"] != 1.0


def test_an_output_that_cannot_be_written_is_found_before_any_feature(tmp_path, sets, monkeypatch):
    """Issue 34, second pass: --save-stats or --json in a folder the run may not write in (or
    --json naming a folder) failed after every image's features were computed."""
    import evaluate
    monkeypatch.setattr(evaluate, "report", lambda *args: pytest.fail("features were extracted"))
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(ValueError, match=f"--json {re.escape(str(tmp_path / 'folder.json'))} is a folder"):
        run_main("evaluate.py", sets["half_a"], sets["half_b"], "--json", tmp_path / "folder.json")
    (tmp_path / "out").mkdir()
    refuse_writes_in(monkeypatch, tmp_path / "out")
    for flag in ("--save-stats", "--json"):
        with pytest.raises(PermissionError, match=f"cannot write in {re.escape(str(tmp_path / 'out'))} \\(the "
                                                  f"folder of {flag} x\\): Permission denied; checked before any work"):
            run_main("evaluate.py", sets["half_a"], sets["half_b"], flag, tmp_path / "out" / "x")


@pytest.mark.parametrize("flags, message", [
    (["--cache-dir", "FILE"], "--cache-dir: FILE is a file, not a folder"),  # was [Errno 17] after the first chunk
    (["--image-size", "0"], "--image-size must be at least 1, got 0"),  # was PIL's "height and width must be > 0"
])
def test_a_bad_folder_flag_is_named_before_any_feature(tmp_path, sets, monkeypatch, flags, message):
    """Issue 34, second pass."""
    import evaluate
    monkeypatch.setattr(evaluate, "report", lambda *args: pytest.fail("features were extracted"))
    (tmp_path / "file").write_text("notes")
    flags = [str(tmp_path / "file") if flag == "FILE" else flag for flag in flags]
    with pytest.raises(ValueError, match=f"^{re.escape(message.replace('FILE', str(tmp_path / 'file')))}$"):
        run_main("evaluate.py", sets["half_a"], sets["half_b"], *flags)


def test_sets_of_other_sizes_and_flat_images_are_warned_about(network):
    import evaluate
    flat = metrics.image_features(network, np.zeros((3, 16, 16), np.uint8))
    varied = metrics.image_features(network, np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8))
    assert flat["image_sizes"] == [(16, 16)] and flat["flat_images"] and not varied["flat_images"]
    warnings = evaluate.warnings("a.npz", flat, "b.npz", varied)
    assert "every image of a.npz is one flat colour: check the sampler and the VAE decoder" in warnings
    assert ("a.npz holds 16x16 images, b.npz 32x32: both are resized to 299x299, so FID also counts the difference "
            "in resolution; compare sets of one size") in warnings
    assert evaluate.warnings("a.npz", varied, "b.npz", dict(varied, pool3=np.zeros((2048, 1)))) == [
        "a.npz holds 3 images; FID from fewer than 2,048 is biased upwards and not comparable with published "
        "figures (50,000 samples)"]


@pytest.mark.slow  # three evaluate.py processes over the same digits: about 40 s on 2 cores
def test_two_processes_extract_what_one_does_and_a_rerun_resumes_per_chunk(tmp_path, sets):
    """torchrun evaluate.py: each rank takes every other chunk of --chunk-images, the features are
    gathered in order; with --cache-dir a finished chunk is kept, so a rerun computes only the rest."""
    np.savez(tmp_path / "digits.npz", arr_0=np.load(sets["half_a"])["arr_0"][:20])
    common = [tmp_path / "digits.npz", "--inception", fid_network_path(), "--chunk-images", "5", "--batch-size", "5",
              "--device", "cpu"]
    run_script("evaluate.py", *common, "--save-stats", tmp_path / "two.npz", nproc=2)
    cache = tmp_path / "cache"
    # One thread, as each of the two processes: the same arithmetic for every image, so the same bits.
    run_script("evaluate.py", *common, "--save-stats", tmp_path / "one.npz", "--cache-dir", cache)
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    for key in ("pool3", "mu", "sigma", "mu_s", "sigma_s"):
        assert np.array_equal(one[key], two[key]), key
    chunks = sorted(cache.iterdir())
    assert len(chunks) == 4
    chunks[2].unlink()
    kept = {path: path.stat().st_mtime_ns for path in chunks if path.exists()}
    run_script("evaluate.py", *common, "--save-stats", tmp_path / "again.npz", "--cache-dir", cache)
    assert chunks[2].is_file() and all(path.stat().st_mtime_ns == mtime for path, mtime in kept.items())
    assert np.array_equal(np.load(tmp_path / "again.npz")["sigma"], one["sigma"])


@pytest.mark.slow  # six evaluations of ten images: about half a minute on 2 cores
def test_the_feature_cache_is_keyed_by_content_not_by_name(tmp_path, sets):
    """Issue 34: --cache-dir reused the features of a batch replaced under the same name, size and
    mtime (FID 92.10 instead of 84.96) and of a folder rewritten in place (76.68 instead of 226.18)."""
    digits = np.load(sets["half_a"])["arr_0"][:10]
    common = [sets["half_b"], "--inception", fid_network_path(), "--batch-size", "5"]

    def fid(source, *cache) -> float:
        run_main("evaluate.py", source, *common, "--json", tmp_path / "m.json", *cache)
        return json.loads((tmp_path / "m.json").read_text())["fid"]

    cache = ["--cache-dir", tmp_path / "cache"]
    batch = tmp_path / "s.npz"
    np.savez(batch, arr_0=digits)
    first = fid(batch, *cache)
    stamp = batch.stat().st_mtime_ns
    np.savez(batch, arr_0=255 - digits)  # another batch: same name, same size
    os.utime(batch, ns=(stamp, stamp))
    assert fid(batch, *cache) == fid(batch) != first
    folder = tmp_path / "images"
    folder.mkdir()
    for index, image in enumerate(digits):
        Image.fromarray(image).save(folder / f"{index:03d}.png")
    before = fid(folder, *cache)
    for index, image in enumerate(digits):  # rewritten in place: the folder's own mtime stays
        Image.fromarray(255 - image).save(folder / f"{index:03d}.png")
    assert fid(folder, *cache) == fid(folder) != before


def test_statistics_of_another_network_are_refused(tmp_path, sets, fidelity_inception_path):
    """Issue 34: train.py --fid-ref STATS --inception OTHER measured against the wrong reference."""
    run_main("evaluate.py", sets["half_b"], "--inception", fid_network_path(), "--save-stats", tmp_path / "ref.npz")
    with pytest.raises(ValueError, match="its statistics come from the network TorchScript default_1.pt"):
        run_main("evaluate.py", sets["half_a"], tmp_path / "ref.npz", "--inception", fidelity_inception_path)
