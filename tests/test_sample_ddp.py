"""sample_ddp.py: two processes, exact resumption, meta.json that never lets runs mix."""
import hashlib
import json
import os
import shutil
import time

import numpy as np
import pytest
import torch
from helpers import DDP_DEVICE, DEVICE, digest, run_main, run_script

pytestmark = pytest.mark.device  # on CUDA when present: see helpers.DEVICE


@pytest.mark.slow  # three sample_ddp.py runs, two under torchrun: about 40 s on 2 cores
def test_sample_ddp_two_processes_and_resume(tmp_path, trained_checkpoint):
    args = ["--ckpt", trained_checkpoint, "--sample-dir", tmp_path / "samples", "--per-proc-batch-size", "3",
            "--num-fid-samples", "10", "--num-sampling-steps", "4", "--device", DEVICE]
    run_script("sample_ddp.py", *args, "--device", DDP_DEVICE, nproc=2)  # the last --device wins
    folders = [p for p in (tmp_path / "samples").iterdir() if p.is_dir()]
    assert len(folders) == 1
    folder = folders[0]
    assert folder.name == "DiT-Nano-2-0000003-size-32-vae-tiny-vae-cfg-1.5-seed-0"
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert pngs == [f"{i:06d}.png" for i in range(12)]  # 10 rounded up to whole global batches of 6
    npz_path = folder.with_name(folder.name + ".npz")
    with np.load(npz_path) as npz:
        assert npz["arr_0"].shape == (10, 32, 32, 3) and npz["arr_0"].dtype == np.uint8
        assert npz["arr_1"].shape == (10,) and set(npz["arr_1"].tolist()) <= {0, 1}
    first = digest(npz_path)

    for index in (0, 4, 11):
        (folder / f"{index:06d}.png").unlink()
    (folder / "000007.png").write_bytes(b"half a png")
    again = run_script("sample_ddp.py", *args, "--device", DDP_DEVICE, nproc=2)
    assert "Kept" in again.stdout
    assert digest(npz_path) == first


def test_sample_ddp_never_mixes_images_of_different_settings(tmp_path, trained_checkpoint, capsys):
    samples = tmp_path / "samples"
    args = ["--sample-dir", samples, "--per-proc-batch-size", "2", "--num-fid-samples", "2",
            "--num-sampling-steps", "4", "--device", DEVICE]
    run_main("sample_ddp.py", "--ckpt", trained_checkpoint, *args)
    folder = next(p for p in samples.iterdir() if p.is_dir())
    npz_path = folder.with_name(folder.name + ".npz")
    first = digest(npz_path)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["checkpoint_sha256"] == digest(trained_checkpoint)
    assert (meta["num_sampling_steps"], meta["world_size"], meta["per_proc_batch_size"]) == (4, 1, 2)
    import diffusers
    import timm
    # The ODE schedulers and the VAE decode come from diffusers, the attention from timm.
    assert (meta["torch"], meta["diffusers"], meta["timm"]) == (torch.__version__, diffusers.__version__,
                                                                 timm.__version__)

    # Other settings, or other weights under the same file name, are refused and name what differs.
    with pytest.raises(ValueError,
                       match=r"other settings \(num_sampling_steps 4 there, 5 now\); rerun with --overwrite"):
        run_main("sample_ddp.py", "--ckpt", trained_checkpoint, *args, "--num-sampling-steps", "5")
    other = tmp_path / "other" / trained_checkpoint.name
    other.parent.mkdir()
    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    checkpoint["ema"]["final_layer.linear.bias"] += 0.1
    torch.save(checkpoint, other)
    with pytest.raises(ValueError,
                       match=r"other settings \(checkpoint_sha256 '[0-9a-f]{64}' there, '[0-9a-f]{64}' now\)"):
        run_main("sample_ddp.py", "--ckpt", other, *args)
    assert digest(npz_path) == first and len(list(folder.glob("*.png"))) == 2

    # The same settings resume; a killed write's temporary file is removed and reported.
    stale = folder / ".000001.png.4242-0123abcd.tmp"
    stale.write_bytes(b"x" * 1000)
    os.utime(stale, (time.time() - 60, time.time() - 60))
    capsys.readouterr()
    run_main("sample_ddp.py", "--ckpt", trained_checkpoint, *args)
    out = capsys.readouterr().out
    assert "Removed 1 temporary file(s) of an interrupted run (1.0 KB)" in out and "Kept 2 existing samples" in out
    assert not stale.exists() and digest(npz_path) == first

    # --overwrite starts clean with the new weights.
    run_main("sample_ddp.py", "--ckpt", other, *args, "--overwrite")
    assert digest(npz_path) != first
    assert json.loads((folder / "meta.json").read_text())["checkpoint_sha256"] == digest(other)

    # PNGs of unknown origin (no meta.json) are not topped up.
    (folder / "meta.json").unlink()
    with pytest.raises(ValueError, match="holds PNGs but no meta.json"):
        run_main("sample_ddp.py", "--ckpt", other, *args)


def test_a_local_vae_replaced_in_place_is_not_topped_up(tmp_path, trained_checkpoint, tiny_vae_path):
    """Issue 34, second pass: meta.json named a local VAE folder by its path, so a folder retrained
    in place topped up the old images with images of the new decoder (as the evaluation cache did)."""
    from diffusers.models import AutoencoderKL
    vae = tmp_path / "vae"
    shutil.copytree(tiny_vae_path, vae)
    args = ["--ckpt", trained_checkpoint, "--vae", vae, "--sample-dir", tmp_path / "s", "--per-proc-batch-size",
            "2", "--num-sampling-steps", "2", "--device", DEVICE]
    run_main("sample_ddp.py", *args, "--num-fid-samples", "2")
    retrained = AutoencoderKL.from_pretrained(vae)
    with torch.no_grad():
        retrained.decoder.conv_out.bias += 0.5
    retrained.save_pretrained(vae)
    with pytest.raises(ValueError, match=r"other settings \(vae_sha256 '[0-9a-f]{64}' there, '[0-9a-f]{64}' now\)"):
        run_main("sample_ddp.py", *args, "--num-fid-samples", "4")


def test_a_file_named_as_the_sample_dir_is_one_line_before_the_model_loads(tmp_path, monkeypatch):
    """Issue 34, second pass: it was "[Errno 20] Not a directory", after the model was loaded."""
    import sample_ddp
    monkeypatch.setattr(sample_ddp, "sample", lambda *args: pytest.fail("the model was loaded"))
    (tmp_path / "samples").write_text("notes")
    with pytest.raises(ValueError, match=f"^--sample-dir: {tmp_path / 'samples'} is a file, not a folder$"):
        run_main("sample_ddp.py", "--ckpt", "DiT-XL-2-256x256.pt", "--sample-dir", tmp_path / "samples")


def test_sample_ddp_rejects_guidance_below_one(tmp_path, trained_checkpoint):
    with pytest.raises(ValueError, match="--cfg-scale must be a number >= 1.0"):
        run_main("sample_ddp.py", "--ckpt", trained_checkpoint, "--cfg-scale", "0.5", "--device", DEVICE)


def test_sample_ddp_resumes_an_ode_solver_with_an_interval_byte_for_byte(tmp_path, trained_checkpoint):
    args = ["--ckpt", trained_checkpoint, "--sample-dir", tmp_path / "s", "--per-proc-batch-size", "2",
            "--num-fid-samples", "6", "--num-sampling-steps", "5", "--sampler", "dpm++", "--cfg-scale", "3",
            "--cfg-interval", "0", "0.7", "--device", DEVICE]
    run_main("sample_ddp.py", *args)
    folder = next(p for p in (tmp_path / "s").iterdir() if p.is_dir())
    assert folder.name.endswith("-cfg-3.0-seed-0-dpm++-interval-0.0-0.7")
    npz = folder.with_name(folder.name + ".npz")
    first = hashlib.sha256(npz.read_bytes()).hexdigest()
    (folder / "000002.png").unlink()
    run_main("sample_ddp.py", *args)
    assert hashlib.sha256(npz.read_bytes()).hexdigest() == first
    with pytest.raises(ValueError, match=r"other settings \(num_sampling_steps 5 there, 6 now\)"):
        run_main("sample_ddp.py", *args, "--num-sampling-steps", "6")


def test_equal_label_sampling_gives_every_class_the_same_count(tmp_path, trained_checkpoint):
    """--label-sampling equal: exactly N / num_classes images of each class (RAE: about 0.1 lower
    FID-50K than the official uniform draw); recorded in meta.json and the folder name."""
    from sample_ddp import balanced_labels
    assert torch.bincount(balanced_labels(50_000, 1000, seed=0)).tolist() == [50] * 1000
    assert torch.bincount(balanced_labels(7, 3, seed=0)).tolist() == [3, 2, 2]
    args = ["--ckpt", trained_checkpoint, "--sample-dir", tmp_path, "--per-proc-batch-size", "4",
            "--num-fid-samples", "10", "--num-sampling-steps", "2", "--device", DEVICE]
    run_main("sample_ddp.py", *args, "--label-sampling", "equal", "--cfg-channels", "all")
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert folder.name.endswith("-cfg-1.5-seed-0-cfg-all-channels-equal-labels")
    with np.load(folder.with_name(folder.name + ".npz")) as npz:
        assert np.bincount(npz["arr_1"]).tolist() == [5, 5]
    meta = json.loads((folder / "meta.json").read_text())
    assert (meta["label_sampling"], meta["cfg_channels"]) == ("equal", "all")
    # Issue 34: a larger --num-fid-samples reshuffles every label, so the 10 images there would keep
    # labels (and draws) of another run; such a folder is refused, not topped up.
    with pytest.raises(ValueError, match="equal_labels_of 10 there, 12 now"):
        run_main("sample_ddp.py", *args, "--num-fid-samples", "12", "--label-sampling", "equal",
                 "--cfg-channels", "all")
    run_main("sample_ddp.py", *args, "--num-fid-samples", "12", "--label-sampling", "equal", "--cfg-channels", "all",
             "--overwrite")
    with np.load(folder.with_name(folder.name + ".npz")) as npz:
        assert np.bincount(npz["arr_1"]).tolist() == [6, 6]
