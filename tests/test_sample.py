"""sample.py: seeded grids, the official recipe and TF32, the samplers, one-line errors."""
import re
from pathlib import Path

import official_reference as official
import pytest
import torch
from helpers import DEVICE, digest, refuse_writes_in, run_main, run_script
from PIL import Image

from ditlib.remote_files import DownloadError
from models import DiT_models

pytestmark = pytest.mark.device  # on CUDA when present: see helpers.DEVICE




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
    assert f"Saved 5 samples to {tmp_path / 'd.png'}" in ddim.stdout and Image.open(tmp_path / "d.png").size == (138,
                                                                                                                 70)


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


@pytest.mark.parametrize("flags,message", [
    (["--nrow", "0"], "--nrow must be at least 1, got 0"),
    (["--output", "outfile"], "--output outfile: give a file name with an image extension"),
    (["--cfg-scale", "-3"], "--cfg-scale must be a number >= 0.0 (1.0 turns guidance off), got -3.0"),
    (["--cfg-scale", "nan"], "--cfg-scale must be a number >= 0.0 (1.0 turns guidance off), got nan"),
    (["--eta", "-1"], "--eta must be >= 0"),
    (["--eta", "0.5", "--sampler", "dpm++"], "--eta 0.5 only applies to --sampler ddim (--sampler dpm++ ignores it)"),
    (["--num-sampling-steps", "0"], "--num-sampling-steps must be at least 2 for DiT's learned-variance sampling, "
                                    "got 0"),
    (["--num-sampling-steps", "1"], "--num-sampling-steps must be at least 2"),
    (["--num-sampling-steps", "4", "--cfg-interval", "0.8", "0.9"],
     "the guidance interval [0.8, 0.9] (in t/1000) holds none of the 4 timesteps ddpm samples at"),
    (["--cfg-interval-sigma", "1000", "2000"], "--cfg-interval-sigma 1000.0 2000.0 holds no timestep"),
    (["--sampler", "dpm++", "--num-sampling-steps", "1000"], "--num-sampling-steps 1000: --sampler dpm++ visits only"),
    (["--sampler", "unipc", "--num-sampling-steps", "1200"], "use at most 999 steps"),
    (["--image-size", "0", "--vae", "none"], "--image-size must be a positive number of pixels, got 0"),
])
def test_bad_sample_flags_are_named_before_any_work(tmp_path, trained_checkpoint, flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        run_main("sample.py", "--ckpt", trained_checkpoint, "--device", DEVICE, "--class-labels", "0", "--output",
                 tmp_path / "x.png", *flags)
    assert not (tmp_path / "x.png").exists()


def test_an_output_folder_that_cannot_be_written_is_found_before_sampling(tmp_path, trained_checkpoint,
                                                                           monkeypatch):
    """Issue 34, second pass: --output in a read-only folder was found when the grid was saved."""
    import sample
    monkeypatch.setattr(sample, "load_model_for_sampling", lambda *args, **kwargs: pytest.fail("sampled"))
    (tmp_path / "grids").mkdir()
    refuse_writes_in(monkeypatch, tmp_path / "grids", 30)
    with pytest.raises(OSError, match=re.escape(f"cannot write in {tmp_path / 'grids'} (the folder of --output "
                                                f"x.png): Read-only file system; checked before any work")):
        run_main("sample.py", "--ckpt", trained_checkpoint, "--output", tmp_path / "grids" / "x.png")


def test_unreachable_hub_vae_is_a_one_line_error(tmp_path, trained_checkpoint):
    result = run_script("sample.py", "--ckpt", trained_checkpoint, "--vae", "mse", "--class-labels", "0",
                        "--num-sampling-steps", "2", "--device", DEVICE, "--output", tmp_path / "x.png",
                        check=False, env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "could not load the VAE 'stabilityai/sd-vae-ft-mse'" in result.stderr
    assert "--vae /path/to/a/local/AutoencoderKL folder" in result.stderr


def test_sample_py_takes_the_solvers_and_checks_the_interval(tmp_path, trained_checkpoint):
    common = ["--ckpt", trained_checkpoint, "--class-labels", "0", "1", "--num-sampling-steps", "4", "--device", DEVICE]
    for sampler in ("dpm++", "unipc"):
        path = run_main("sample.py", *common, "--sampler", sampler, "--output", tmp_path / f"{sampler}.png")
        assert path.is_file()
    with pytest.raises(ValueError, match=re.escape("--cfg-interval LO HI needs 0 <= LO <= HI <= 1 (fractions of the "
                                                   "1000 timesteps), got 0.8 0.2")):
        run_main("sample.py", *common, "--cfg-interval", "0.8", "0.2", "--output", tmp_path / "x.png")


@pytest.mark.parametrize("script", ["sample.py", "sample_ddp.py"])
def test_an_official_name_as_ckpt_is_fetched_as_find_model_does(tmp_path, monkeypatch, script):
    """--ckpt DiT-XL-2-512x512.pt (not a local file): the official find_model downloads it; so do we,
    as the 512px model (before: 'no such file')."""
    from ditlib import weights
    asked = []

    def find_model(name):
        asked.append(name)
        raise DownloadError("stopped before the download")

    monkeypatch.setattr(weights, "find_model", find_model)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DownloadError):
        run_main(script, "--ckpt", "DiT-XL-2-512x512.pt", "--device", "cpu")
    assert asked == ["DiT-XL-2-512x512.pt"]
    with pytest.raises(ValueError, match="--ckpt DiT-XL-2-512x512.pt is the 512px model; --image-size 256 does not"):
        run_main(script, "--ckpt", "DiT-XL-2-512x512.pt", "--image-size", "256", "--device", "cpu")


def test_a_vae_the_weights_cannot_take_is_named(tmp_path, image_folder_path):
    """sample.py --vae mse on a pixel-space model said only 'input_size 2 is not divisible by patch_size 4'."""
    run_main("train.py", "--data-path", image_folder_path, "--results-dir", tmp_path / "r", "--global-batch-size", "4",
             "--max-steps", "1", "--model", "DiT-Nano/4", "--image-size", "16", "--vae", "none", "--num-classes", "2",
             "--num-workers", "0", "--device", DEVICE)
    checkpoint = next((tmp_path / "r").glob("*/checkpoints/0000001.pt"))
    with pytest.raises(ValueError, match=r"--vae mse gives the model 4-channel inputs, but the weights in .* take 3 "
                                         r"channels \(pixels: --vae none\)"):
        run_main("sample.py", "--ckpt", checkpoint, "--vae", "mse", "--image-size", "32", "--device", DEVICE,
                 "--output", tmp_path / "x.png")


def test_cfg_channels_all_guides_the_fourth_latent_channel_too(tmp_path, trained_checkpoint, monkeypatch):
    """--cfg-channels 3 is the official guidance (first three of four latent channels); all guides every
    channel, as diffusers' DiTPipeline does."""
    import sample
    captured = []
    monkeypatch.setattr(sample, "decode", lambda vae, latents: captured.append(latents.clone()) or latents[:, :3])
    monkeypatch.setattr(sample, "save_image_grid", lambda images, path, nrow: Path(path))
    common = ["--ckpt", trained_checkpoint, "--class-labels", "0", "1", "--num-sampling-steps", "3", "--device",
              DEVICE, "--output", tmp_path / "x.png", "--sampler", "ddim"]
    for channels in ("3", "all"):
        run_main("sample.py", *common, "--cfg-channels", channels)
    three, every = captured
    assert not torch.equal(three, every)


def sit_checkpoint(path: Path, learn_sigma: bool) -> Path:
    """What SiT's train.py writes (model, ema, opt, its args as a Namespace) for a tiny SiT on the
    tiny VAE's latents, every weight random; learn_sigma=False is the 4-channel layout SiT's
    sample.py builds."""
    import argparse

    from models import SiT_models
    torch.manual_seed(11)
    model = SiT_models["SiT-Pico/2"](input_size=4, num_classes=3, learn_sigma=learn_sigma)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    args = argparse.Namespace(model="SiT-Pico/2", image_size=32, num_classes=3, vae="ema", path_type="Linear",
                              prediction="velocity", loss_weight=None, train_eps=None, sample_eps=None)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "args": args}, path)
    return path


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("mode, flags", [
    ("ode", ["--num-sampling-steps", "6", "--sampling-method", "euler"]),
    ("ode", ["--num-sampling-steps", "4"]),  # dopri5, adaptive
    ("sde", ["--num-sampling-steps", "8"]),
    ("sde", ["--num-sampling-steps", "5", "--sampling-method", "Heun", "--last-step", "Tweedie",
             "--diffusion-form", "linear"]),
])
def test_sit_sample_latents_equal_sits_sample_script(tmp_path, tiny_vae_path, monkeypatch, learn_sigma, mode, flags):
    """SiT's `python sample.py ODE|SDE`, written out with the transcribed transport: seed, build
    (learn_sigma as the checkpoint holds), load, noise, the CFG batch with the null class, the
    sampler's last point, the conditional half."""
    import sit_reference as ref

    import sample
    from models import SiT_models
    checkpoint = sit_checkpoint(tmp_path / "sit.pt", learn_sigma)
    captured = {}
    monkeypatch.setattr(sample, "decode", lambda vae, latents: captured.setdefault("latents", latents.clone()))
    monkeypatch.setattr(sample, "save_image_grid", lambda images, path, nrow: Path(path))
    sample.main(sample.parse_args(["--ckpt", str(checkpoint), "--vae", str(tiny_vae_path), "--sampler", mode,
                                   "--class-labels", "2", "0", "--cfg-scale", "3.0", "--device", DEVICE,
                                   "--output", str(tmp_path / "x.png"), *flags]))

    options = dict(zip(flags[::2], flags[1::2]))
    steps = int(options["--num-sampling-steps"])
    torch.manual_seed(0)
    net = SiT_models["SiT-Pico/2"](input_size=4, num_classes=3, learn_sigma=learn_sigma).to(DEVICE)
    net.load_state_dict(torch.load(checkpoint, weights_only=False)["ema"])
    net.eval()
    z = torch.randn(2, 4, 4, 4, device=DEVICE)
    z = torch.cat([z, z], 0)
    y = torch.tensor([2, 0, 3, 3], device=DEVICE)

    def model_fn(x, t, y, cfg_scale):
        return ref.forward_with_cfg(net, x, t, y, cfg_scale, learn_sigma)

    with torch.no_grad():
        if mode == "ode":
            expected = ref.sample_ode("Linear", "velocity", 0, model_fn, z, dict(y=y, cfg_scale=3.0),
                                      options.get("--sampling-method", "dopri5"), steps)
        else:
            expected = ref.sample_sde("Linear", "velocity", 0, model_fn, z, dict(y=y, cfg_scale=3.0),
                                      options.get("--sampling-method", "Euler"),
                                      options.get("--diffusion-form", "sigma"), 1.0,
                                      options.get("--last-step", "Mean"), 0.04, steps)
    expected = expected[:2]
    if DEVICE == "cpu":
        assert torch.equal(captured["latents"], expected)
    else:
        torch.testing.assert_close(captured["latents"], expected, atol=1e-5, rtol=0)
