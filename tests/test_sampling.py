"""sample.py, sample_ddp.py and download.py, offline: tiny checkpoints, a tiny VAE, a loopback server."""
import hashlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import download
from conftest import DDP_DEVICE, DEVICE, LoopbackServer, make_image_folder, run_main, run_script
from models import DiT_models
import official_reference as official
from sampling import guided_batch
from weights import load_weights

pytestmark = pytest.mark.device  # on CUDA when present: see conftest.DEVICE


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- sample.py -----------------------------------------------------------------------------------

def test_sample_writes_a_seeded_grid(tmp_path, trained_checkpoint):
    common = ["--ckpt", trained_checkpoint, "--class-labels", "0", "1", "1", "0", "1", "--num-sampling-steps", "5",
              "--device", DEVICE]
    first, again, other = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    run_main("sample.py", *common, "--output", first)
    run_main("sample.py", *common, "--output", again)
    run_main("sample.py", *common, "--output", other, "--seed", "1")
    assert Image.open(first).size == (4 * 32 + 5 * 2, 2 * 32 + 3 * 2)  # 5 images, 4 per row
    assert digest(first) == digest(again)
    assert digest(first) != digest(other)
    ddim = run_script("sample.py", *common, "--output", tmp_path / "d.png", "--sampler", "ddim")  # as a user runs it
    assert f"Saved 5 samples to {tmp_path / 'd.png'}" in ddim.stdout and Image.open(tmp_path / "d.png").size == (138, 70)


def test_sample_latents_equal_the_official_recipe(tmp_path, trained_checkpoint, monkeypatch):
    """The official sample.py, written out with the transcribed official sampler: seed, build,
    load, (VAE), noise, CFG batch, ancestral loop over the official "7"-step respacing."""
    import sample
    captured = {}
    monkeypatch.setattr(sample, "decode", lambda vae, latents: captured.setdefault("latents", latents.clone()))
    monkeypatch.setattr(sample, "save_image_grid", lambda images, path, nrow: Path(path))
    sample.main(sample.parse_args(["--ckpt", str(trained_checkpoint), "--class-labels", "1", "0",
                                   "--num-sampling-steps", "7", "--cfg-scale", "3.0", "--device", DEVICE,
                                   "--output", str(tmp_path / "x.png")]))

    torch.manual_seed(0)
    model = DiT_models["DiT-Nano/2"](input_size=4, num_classes=2)
    model.load_state_dict(torch.load(trained_checkpoint, weights_only=True)["ema"])
    model.eval()
    z = torch.randn(2, 4, 4, 4)
    y = torch.tensor([1, 0])
    z = torch.cat([z, z], 0)
    y = torch.cat([y, torch.tensor([2, 2])], 0)
    expected = official.p_sample_loop("7", model.forward_with_cfg, z.shape, z, clip_denoised=False,
                                      model_kwargs=dict(y=y, cfg_scale=3.0))[:2]
    torch.testing.assert_close(captured["latents"], expected, atol=1e-5, rtol=0)


@pytest.fixture
def tf32_flags():
    """Restores PyTorch's TF32 flags after a test that lets scripts set them."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_tf32_flags_as_the_official_scripts_set_them(tmp_path, trained_checkpoint, tf32_flags):
    """sample.py turns TF32 on for matmuls and cuDNN; sample_ddp.py's --tf32 sets the matmul flag only."""
    import sample
    import sample_ddp
    common = ["--ckpt", str(trained_checkpoint), "--class-labels", "0", "--num-sampling-steps", "2", "--device", DEVICE]
    sample.main(sample.parse_args([*common, "--output", str(tmp_path / "a.png")]))
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    sample.main(sample.parse_args([*common, "--output", str(tmp_path / "b.png"), "--no-tf32"]))
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    sample_ddp.main(sample_ddp.parse_args(["--ckpt", str(trained_checkpoint), "--sample-dir", str(tmp_path / "s"),
                                           "--per-proc-batch-size", "1", "--num-fid-samples", "1",
                                           "--num-sampling-steps", "2", "--device", DEVICE]))
    assert torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


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
    from diffusers_interop import export_command
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
    import argparse
    export_command(argparse.Namespace(ckpt=str(official_path), out=str(tmp_path / "exported"), model=None,
                                      image_size=None, num_classes=None, vae=None, weights="ema"))
    assert (tmp_path / "exported" / "config.json").is_file()
    # train.py cannot resume it exactly, and says so in one line.
    data = make_image_folder(tmp_path / "images")
    with pytest.raises(ValueError, match="an official train.py checkpoint; it holds no step counter or RNG state"):
        train.main(train.parse_args(["--data-path", str(data), "--results-dir", str(tmp_path / "results"),
                                     "--model", "DiT-Nano/2", "--image-size", "32", "--vae", str(tiny_vae_path),
                                     "--num-classes", "2", "--global-batch-size", "4", "--num-workers", "0",
                                     "--device", DEVICE, "--resume", str(official_path)]))


def test_checkpoint_needing_other_code_is_refused_without_running_it(tmp_path):
    import os
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


def test_mismatched_checkpoint_names_tensors_and_right_flags(tmp_path, trained_checkpoint):
    with pytest.raises(ValueError) as error:
        run_main("sample.py", "--ckpt", trained_checkpoint, "--model", "DiT-Nano/4", "--image-size", "64",
                 "--device", DEVICE, "--class-labels", "0", "--output", tmp_path / "x.png")
    assert "does not fit the chosen model" in str(error.value)
    assert "x_embedder.proj.weight: checkpoint (128, 4, 2, 2) vs model (128, 4, 4, 4)" in str(error.value)
    assert "--model DiT-Nano/2 --image-size 32" in str(error.value)


def test_load_weights_accepts_a_matching_state_dict():
    model = DiT_models["DiT-Nano/4"](input_size=8, num_classes=3)
    state = {k: v + 1 for k, v in model.state_dict().items()}
    load_weights(model, state, "in-memory")
    assert torch.equal(model.pos_embed, state["pos_embed"])


def test_guided_batch():
    model = DiT_models["DiT-Nano/4"](input_size=8, num_classes=3)
    noise, labels = torch.randn(2, 4, 8, 8), torch.tensor([0, 2])
    x, fn, kwargs = guided_batch(noise, labels, 3, 4.0, model)
    assert x.shape[0] == 4 and fn == model.forward_with_cfg and kwargs["y"].tolist() == [0, 2, 3, 3]
    x, fn, kwargs = guided_batch(noise, labels, 3, 1.0, model)
    assert x is noise and fn == model.forward and kwargs == {"y": labels}


# ---- sample_ddp.py --------------------------------------------------------------------------------

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

    # Other settings, or other weights under the same file name, are refused and name what differs.
    with pytest.raises(ValueError, match=r"other settings \(num_sampling_steps 4 there, 5 now\); rerun with --overwrite"):
        run_main("sample_ddp.py", "--ckpt", trained_checkpoint, *args, "--num-sampling-steps", "5")
    other = tmp_path / "other" / trained_checkpoint.name
    other.parent.mkdir()
    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    checkpoint["ema"]["final_layer.linear.bias"] += 0.1
    torch.save(checkpoint, other)
    with pytest.raises(ValueError, match=r"other settings \(checkpoint_sha256 '[0-9a-f]{64}' there, '[0-9a-f]{64}' now\)"):
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


@pytest.mark.parametrize("flags,message", [
    (["--nrow", "0"], "--nrow must be at least 1, got 0"),
    (["--output", "outfile"], "--output outfile: give a file name with an image extension"),
    (["--cfg-scale", "-3"], "--cfg-scale must be >= 0.0"),
    (["--eta", "-1"], "--eta must be >= 0"),
    (["--num-sampling-steps", "0"], "--num-sampling-steps must be at least 2 for DiT's learned-variance sampling, got 0"),
    (["--num-sampling-steps", "1"], "--num-sampling-steps must be at least 2"),
    (["--image-size", "0", "--vae", "none"], "--image-size must be a positive number of pixels, got 0"),
])
def test_bad_sample_flags_are_named_before_any_work(tmp_path, trained_checkpoint, flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        run_main("sample.py", "--ckpt", trained_checkpoint, "--device", DEVICE, "--class-labels", "0", "--output",
                 tmp_path / "x.png", *flags)
    assert not (tmp_path / "x.png").exists()


def test_sample_ddp_rejects_guidance_below_one(tmp_path, trained_checkpoint):
    with pytest.raises(ValueError, match="--cfg-scale must be >= 1.0"):
        run_main("sample_ddp.py", "--ckpt", trained_checkpoint, "--cfg-scale", "0.5", "--device", DEVICE)


# ---- download.py ----------------------------------------------------------------------------------

@pytest.fixture
def server(monkeypatch):
    srv = LoopbackServer()
    monkeypatch.setenv("DIT_MODELS_URL", srv.url)
    yield srv
    srv.close()


def checkpoint_bytes(tmp_path) -> bytes:
    model = DiT_models["DiT-Nano/4"](input_size=8, num_classes=3)
    torch.save(model.state_dict(), tmp_path / "ok.pt")
    return (tmp_path / "ok.pt").read_bytes()


NAME = "DiT-XL-2-256x256.pt"


def test_download_success_then_cached(tmp_path, server):
    body = checkpoint_bytes(tmp_path)
    server.routes[f"/models/{NAME}"] = (200, body, None)
    target = download.download_model(NAME, tmp_path / "pretrained")
    assert target.read_bytes() == body
    server.routes.clear()  # a second call must not touch the network
    assert download.download_model(NAME, tmp_path / "pretrained") == target
    assert sorted(p.name for p in (tmp_path / "pretrained").iterdir()) == [NAME]


@pytest.mark.parametrize("case,message", [
    ("cut", "connection ended after"),
    ("corrupt", "is not a readable PyTorch checkpoint"),
    ("not-dit", "is not a DiT checkpoint"),
    ("missing", "HTTP Error 404"),
])
def test_download_failures_leave_nothing(tmp_path, server, case, message):
    body = checkpoint_bytes(tmp_path)
    route = f"/models/{NAME}"
    if case == "cut":
        server.routes[route] = (200, body[: len(body) // 2], len(body))
    elif case == "corrupt":
        server.routes[route] = (200, body[: len(body) // 2], None)
    elif case == "not-dit":
        torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
        server.routes[route] = (200, (tmp_path / "other.pt").read_bytes(), None)
    with pytest.raises(download.DownloadError) as error:
        download.download_model(NAME, tmp_path / "pretrained")
    text = str(error.value)
    assert message in text
    assert f"{server.url}/{NAME}" in text and str((tmp_path / "pretrained" / NAME).resolve()) in text
    assert list((tmp_path / "pretrained").iterdir()) == []


def test_find_model_local_files(tmp_path):
    model = DiT_models["DiT-Nano/4"](input_size=8, num_classes=3)
    state = model.state_dict()
    torch.save({"model": state, "ema": {k: v + 1 for k, v in state.items()}, "args": {}}, tmp_path / "train.pt")
    import argparse
    torch.save({"model": state, "ema": {k: v + 2 for k, v in state.items()}, "opt": {},
                "args": argparse.Namespace(model="DiT-Nano/4")}, tmp_path / "official.pt")
    torch.save(state, tmp_path / "bare.pt")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    assert torch.equal(download.find_model(tmp_path / "train.pt")["pos_embed"], state["pos_embed"] + 1)
    assert torch.equal(download.load_state_dict(tmp_path / "train.pt", "model")["pos_embed"], state["pos_embed"])
    assert torch.equal(download.find_model(tmp_path / "official.pt")["pos_embed"], state["pos_embed"] + 2)
    assert torch.equal(download.load_state_dict(tmp_path / "official.pt", "model")["pos_embed"], state["pos_embed"])
    assert download.checkpoint_args(download.read_checkpoint(tmp_path / "official.pt")) == {"model": "DiT-Nano/4"}
    assert torch.equal(download.find_model(tmp_path / "bare.pt")["pos_embed"], state["pos_embed"])
    assert torch.equal(download.find_model(tmp_path / "w.safetensors")["pos_embed"], state["pos_embed"])
    with pytest.raises(FileNotFoundError, match="not one of the official names"):
        download.find_model(tmp_path / "nope.pt")


def test_unreachable_hub_vae_is_a_one_line_error(tmp_path, trained_checkpoint):
    result = run_script("sample.py", "--ckpt", trained_checkpoint, "--vae", "mse", "--class-labels", "0",
                        "--num-sampling-steps", "2", "--device", DEVICE, "--output", tmp_path / "x.png",
                        check=False, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "could not load the VAE 'stabilityai/sd-vae-ft-mse'" in result.stderr
    assert "--vae /path/to/a/local/AutoencoderKL folder" in result.stderr
