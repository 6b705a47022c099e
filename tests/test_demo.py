"""The MNIST demo's pipeline, end to end at a few steps (its real figures are in README)."""
import json

import pytest
from helpers import run_script
from PIL import Image


@pytest.mark.slow  # three processes, the judge and the FID network: over a minute on 2 cores (make test-all)
def test_demo_pipeline_runs_and_its_judge_is_trustworthy(tmp_path):
    out = tmp_path / "demo"
    result = run_script("demo.mnist", "--out", out, "--max-steps", "4", "--global-batch-size", "32",
                        "--per-class", "2", "--sample-steps", "3", "--fid-reference", "60", timeout=600,
                        env={"OMP_NUM_THREADS": "2"})  # one process at a time: it may use both cores
    report = json.loads((out / "report.json").read_text())
    assert report["train_steps"] == 4 and report["sampled_digits"] == 20
    assert report["classifier_accuracy_on_real"] > 0.93  # the judge itself must know real digits
    assert report["class_accuracy_of_samples"] < 0.5  # four steps draw blobs, not digits (chance is 0.1)
    # Four training steps make blobs, far from real digits; held-out real digits sit near the reference.
    assert report["fid_images"] == [20, 60]
    assert report["fid_samples_vs_real"] > 2 * report["fid_held_out_real_vs_real"] > 0
    # FD-digits, guided and unguided, against the floor of held-out real digits (issue 23's metric).
    assert min(report["fd_digits_samples"], report["fd_digits_unguided"]) > 2 * report["fd_digits_held_out_real"]
    assert report["class_accuracy_unguided"] < 0.5
    assert len(list((out / "mnist").rglob("*.png"))) == 5000
    assert sorted(p.name for p in (out / "mnist").iterdir() if p.is_dir()) == [str(d) for d in range(10)]
    assert Image.open(out / "samples.png").size == (10 * 16 + 11 * 2, 2 * 16 + 3 * 2)
    assert f"sample grid (one digit class per column, 0-9): {out / 'samples.png'}" in result.stdout


def test_fid_reference_is_cached_and_read_back(tmp_path):
    import numpy as np
    import torch
    from helpers import fid_network_path

    from ditlib.metrics import InceptionNetwork
    from experiments.digits import fid_reference

    network = InceptionNetwork(str(fid_network_path()))
    real = np.random.default_rng(0).integers(0, 256, (12, 16, 16), dtype=np.uint8)
    first = fid_reference(network, real, torch.arange(10), tmp_path)
    assert (tmp_path / "fid_reference_16px_10.npz").is_file()
    again = fid_reference(network, real, torch.arange(10), tmp_path)
    assert np.array_equal(again["mu"], first["mu"]) and np.array_equal(again["pool3"], first["pool3"])


@pytest.mark.parametrize("flags, message", [
    (["--per-class", "0"], "--per-class must be at least 1, got 0"),  # was sample.py's CalledProcessError
    (["--fid-reference", "1"], "--fid-reference must be at least 2 (a covariance), got 1"),  # was a conv2d error
    (["--nproc", "0"], "--nproc must be at least 1, got 0"),  # was taken as 1
    (["--out", "FILE"], "--out: FILE is a file, not a folder"),  # was "[Errno 20] Not a directory"
])
def test_a_bad_recipe_flag_is_one_line_before_the_digits_are_written(tmp_path, monkeypatch, flags, message):
    """Issue 34, second pass: these ended the demo after its training run (the first two in a
    traceback) or at its first file."""
    import sys

    import demo.mnist
    from ditlib.errors import SettingError
    (tmp_path / "file").write_text("notes")
    flags = [str(tmp_path / "file") if flag == "FILE" else flag for flag in flags]
    monkeypatch.setattr(sys, "argv", ["mnist.py", "--out", str(tmp_path / "out"), "--max-steps", "1", *flags])
    with pytest.raises(ValueError) as raised:
        demo.mnist.main()
    error = raised.value.as_flag() if isinstance(raised.value, SettingError) else raised.value
    assert str(error) == message.replace("FILE", str(tmp_path / "file"))
    assert not (tmp_path / "out" / "mnist").exists()
