"""The flag groups that several commands define alike. The commands read them into the library's
dataclasses (weights.ModelSource, samplers.SamplingSettings) with settings_from."""
from dataclasses import fields
from typing import Mapping, TypeVar

from ditlib.samplers import SAMPLERS
from models import BLOCK_DESIGNS

T = TypeVar("T")


def settings_from(kind: type[T], values: Mapping) -> T:
    """A settings dataclass from the values of the same names (a command's vars(args)); the fields
    missing from values keep their defaults."""
    return kind(**{f.name: values[f.name] for f in fields(kind) if f.name in values})


def add_device_flags(parser, tf32_help: str) -> None:
    """--device and --tf32/--no-tf32, the same in every command."""
    group = parser.add_argument_group("device")
    group.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                       help="auto: CUDA (NCCL) when available, else the CPU (gloo)")
    group.add_argument("--tf32", dest="tf32", action="store_true", default=True, help=tf32_help)
    group.add_argument("--no-tf32", dest="tf32", action="store_false", help="full fp32 on GPUs")


def add_model_flags(parser, default_vae: str, vae_help: str = "") -> None:
    """What to sample from: the model flags of sample.py, sample_ddp.py and convert_diffusers.py (a
    weights.ModelSource). Those not given fall back to a train.py checkpoint's saved flags, then to
    the official defaults."""
    group = parser.add_argument_group("model (unset flags fall back to a train.py checkpoint's own, "
                                      "then to the official defaults)")
    group.add_argument("--ckpt", type=str, default=None,
                       help="a train.py checkpoint, a state dict, .safetensors or an official name "
                            "(default: the official DiT-XL/2 for --image-size, downloaded on first use)")
    group.add_argument("--model", type=str, default=None, help="default DiT-XL/2")
    group.add_argument("--vae", type=str, default=None,
                       help=vae_help or f"ema | mse | none | local AutoencoderKL folder (default {default_vae})")
    group.add_argument("--image-size", type=int, default=None, help="default 256")
    group.add_argument("--num-classes", type=int, default=None, help="default 1000")
    group.add_argument("--weights", choices=["ema", "model"], default="ema",
                       help="which weights of a train.py checkpoint")
    group.add_argument("--block", choices=BLOCK_DESIGNS, default=None,
                       help="block design (default: the checkpoint's, else read from its weights)")


def add_sampler_flags(parser, cfg_scale: float) -> None:
    """The sampler group of sample.py and sample_ddp.py (a samplers.SamplingSettings; official names
    and defaults first)."""
    group = parser.add_argument_group("sampler")
    group.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                       help="ddpm: ancestral (official); ddim; dpm++: DPM-Solver++(2M); unipc: UniPC (bh2, order 2)")
    group.add_argument("--num-sampling-steps", type=int, default=250)
    group.add_argument("--cfg-scale", type=float, default=cfg_scale)
    group.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0: deterministic); ddim only")
    group.add_argument("--cfg-channels", choices=["3", "all"], default="3",
                       help="guide the first 3 latent channels (the official code, behind the paper's FIDs) or all "
                            "4, as diffusers' DiTPipeline (scale 1.375 on all is close to 1.5 on three)")
    interval = group.add_mutually_exclusive_group()
    interval.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                          help="guide only at timesteps t with LO <= t/1000 <= HI (t/1000 = 1: pure noise), "
                               "e.g. 0 0.7; elsewhere one unguided forward (default: guide at every step)")
    interval.add_argument("--cfg-interval-sigma", type=float, nargs=2, metavar=("SIGMA_LO", "SIGMA_HI"), default=None,
                          help="the same in noise levels sigma = sqrt((1 - alpha_bar) / alpha_bar), the unit of "
                               "Kynkaanniemi et al. (docs/sampling.md has the table)")
