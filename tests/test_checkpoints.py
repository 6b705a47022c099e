"""ditlib/checkpoints.py: official train.py checkpoints load everywhere, pickled code is refused, and damaged
files are told apart from I/O errors."""
import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DEVICE, PIXEL, digest, make_image_folder, only_experiment, run_main

import download
from ditlib.checkpoints import DamagedCheckpoint, read_checkpoint
from models import DiT_models

pytestmark = pytest.mark.device  # on CUDA when present: see helpers.DEVICE


def official_checkpoint(ours: Path, path: Path) -> Path:
    """What the official train.py writes: plain torch.save of model, ema, opt and an argparse.Namespace."""
    import argparse
    checkpoint = torch.load(ours, weights_only=True)
    args = argparse.Namespace(data_path="/data/imagenet/train", results_dir="results", model="DiT-Nano/2",
                              image_size=32, num_classes=2, epochs=1400, global_batch_size=4, global_seed=0,
                              vae="ema", num_workers=4, log_every=100, ckpt_every=50_000)
    torch.save({"model": checkpoint["model"], "ema": checkpoint["ema"], "opt": checkpoint["opt"], "args": args}, path)
    return path


def test_official_train_checkpoints_load_everywhere(tmp_path, trained_checkpoint, tiny_vae_path):
    import sample
    import sample_ddp
    import train
    official_path = official_checkpoint(trained_checkpoint, tmp_path / "0050000.pt")
    ours = torch.load(trained_checkpoint, weights_only=True)
    # find_model takes the EMA, as the official find_model does.
    loaded = download.find_model(official_path)
    assert loaded.keys() == ours["ema"].keys() and all(torch.equal(loaded[k], ours["ema"][k]) for k in loaded)
    # sample.py: model, size and classes come from the Namespace; the picture equals our checkpoint's.
    common = ["--vae", str(tiny_vae_path), "--class-labels", "0", "1", "--num-sampling-steps", "3", "--device", DEVICE]
    sample.main(sample.parse_args(["--ckpt", str(official_path), "--output", str(tmp_path / "official.png"), *common]))
    sample.main(sample.parse_args(["--ckpt", str(trained_checkpoint), "--output", str(tmp_path / "ours.png"), *common]))
    assert digest(tmp_path / "official.png") == digest(tmp_path / "ours.png")
    # sample_ddp.py (a world of one) and the diffusers export read it too.
    sample_ddp.main(sample_ddp.parse_args(["--ckpt", str(official_path), "--sample-dir", str(tmp_path / "samples"),
                                           "--per-proc-batch-size", "2", "--num-fid-samples", "2",
                                           "--num-sampling-steps", "2", *common[:2], "--device", DEVICE]))
    with np.load(next((tmp_path / "samples").glob("*.npz"))) as npz:
        assert npz["arr_0"].shape == (2, 32, 32, 3)
    run_main("convert_diffusers.py", "export", "--ckpt", official_path, "--out", tmp_path / "exported")
    assert (tmp_path / "exported" / "config.json").is_file()
    # train.py cannot resume it exactly, and says so in one line.
    data = make_image_folder(tmp_path / "images")
    with pytest.raises(ValueError, match="an official train.py checkpoint; it holds no step counter or RNG state"):
        train.main(train.parse_args(["--data-path", str(data), "--results-dir", str(tmp_path / "results"),
                                     "--model", "DiT-Nano/2", "--image-size", "32", "--vae", str(tiny_vae_path),
                                     "--num-classes", "2", "--global-batch-size", "4", "--num-workers", "0",
                                     "--device", DEVICE, "--resume", str(official_path)]))


def test_checkpoint_needing_other_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    state = DiT_models["DiT-Nano/4"](input_size=8, num_classes=3).state_dict()
    torch.save({"model": state, "ema": state, "args": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError) as error:
        download.find_model(tmp_path / "evil.pt")
    message = str(error.value)
    assert f"{tmp_path / 'evil.pt'} needs the Python global(s) {os.system.__module__}.system" in message
    assert "weights_only=False" in message and "converted.pt" in message and "\n" not in message
    assert not marker.exists()
    with pytest.raises(ValueError, match="needs the Python global"):  # one line through run_cli, as every ValueError
        run_main("sample.py", "--ckpt", tmp_path / "evil.pt", "--device", DEVICE)
    assert not marker.exists()


def wrapped_eio() -> RuntimeError:
    """torch.load's zip reader reports some disk errors as a RuntimeError caused by the OSError."""
    error = RuntimeError("PytorchStreamReader failed reading zip archive")
    error.__cause__ = OSError(errno.EIO, "Input/output error")
    return error


@pytest.mark.parametrize("failure", [OSError(errno.EIO, "Input/output error"),
                                     OSError(errno.EACCES, "Permission denied"),
                                     OSError(errno.ESTALE, "Stale file handle"), MemoryError(), wrapped_eio()])
def test_an_io_error_is_not_a_damaged_checkpoint_and_moves_nothing(tmp_path, image_folder_path, monkeypatch, failure):
    """On network storage one EIO must not move a valid checkpoint aside as .corrupt (a requeued job
    would then start afresh): only bytes that do not form a checkpoint mean damaged."""
    args = ["--data-path", image_folder_path, "--results-dir", tmp_path / "results", "--global-batch-size", "4",
            "--ckpt-every", "1", *PIXEL]
    run_main("train.py", *args, "--max-steps", "2")
    folder = only_experiment(tmp_path / "results") / "checkpoints"
    before = sorted(p.name for p in folder.iterdir())

    def failing_load(*args, **kwargs):
        raise failure

    monkeypatch.setattr(torch, "load", failing_load)
    kind = MemoryError if isinstance(failure, MemoryError) else OSError
    strerror = (failure.__cause__ or failure).strerror if kind is OSError else None
    message = "not enough memory to read" if kind is MemoryError else f"cannot read .*0000002.pt: {strerror}"
    with pytest.raises(kind, match=message):
        run_main("train.py", *args, "--max-steps", "3", "--resume", "auto")
    with pytest.raises(kind, match=message):
        read_checkpoint(folder / "0000002.pt")
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing moved aside, nothing written
    monkeypatch.undo()
    for damaged in (b"", b"garbage", (folder / "0000002.pt").read_bytes()[:3000]):
        (tmp_path / "damaged.pt").write_bytes(damaged)
        with pytest.raises(DamagedCheckpoint, match="is not a readable PyTorch checkpoint"):
            read_checkpoint(tmp_path / "damaged.pt")
