"""The flag groups that several commands define alike. The commands read them into the library's
dataclasses (weights.ModelSource, samplers.SamplingSettings) with settings_from."""
from dataclasses import fields
from typing import Mapping, TypeVar

from ditlib.samplers import FLOW_SAMPLERS, SAMPLERS
from models import BLOCK_DESIGNS
from transport import DIFFUSION_FORMS, LOSS_WEIGHTS, PATHS, PREDICTIONS

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
    add_transport_flags(group, "SiT only; default: the checkpoint's, else SiT's")


def add_transport_flags(group, note: str) -> None:
    """SiT's transport flags (its names and choices): what a SiT model was trained to predict."""
    group.add_argument("--path-type", choices=list(PATHS), default=None, help=f"the interpolant ({note}: Linear)")
    group.add_argument("--prediction", choices=list(PREDICTIONS), default=None,
                       help=f"what the network predicts ({note}: velocity)")
    group.add_argument("--loss-weight", type=none_or_str, choices=list(LOSS_WEIGHTS), default=None,
                       help=f"None | velocity | likelihood ({note}: None)")
    group.add_argument("--train-eps", type=float, default=None,
                       help=f"{note}: 0 for velocity on Linear or GVP, else 1e-3 (VP: 1e-5)")
    group.add_argument("--sample-eps", type=float, default=None,
                       help=f"{note}: 0 for velocity on Linear or GVP, else 1e-3 (needs --train-eps)")


def none_or_str(value: str):
    """SiT's spelling of None on the command line."""
    return None if value == "None" else value


def add_sampler_flags(parser, cfg_scale: float) -> None:
    """The sampler group of sample.py and sample_ddp.py (a samplers.SamplingSettings; official names
    and defaults first)."""
    group = parser.add_argument_group("sampler")
    group.add_argument("--sampler", choices=SAMPLERS + FLOW_SAMPLERS, default=None,
                       help="a DiT: ddpm: ancestral (official, the default); ddim; dpm++: DPM-Solver++(2M); "
                            "unipc: UniPC (bh2, order 2). A SiT: ode or sde (the default), SiT's two modes")
    group.add_argument("--num-sampling-steps", type=int, default=250)
    group.add_argument("--cfg-scale", type=float, default=cfg_scale)
    group.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0: deterministic); ddim only")
    group.add_argument("--cfg-channels", choices=["3", "all"], default="3",
                       help="guide the first 3 latent channels (the official code, behind the paper's FIDs) or all "
                            "4, as diffusers' DiTPipeline (scale 1.375 on all is close to 1.5 on three)")
    flow = parser.add_argument_group("SiT's samplers (defaults as SiT's sample.py)")
    flow.add_argument("--sampling-method", default=None,
                      help="ode: any torchdiffeq method (default dopri5); sde: Euler (default) or Heun")
    flow.add_argument("--atol", type=float, default=None, help="ode: absolute tolerance (default 1e-6)")
    flow.add_argument("--rtol", type=float, default=None, help="ode: relative tolerance (default 1e-3)")
    flow.add_argument("--reverse", action="store_true", help="ode: integrate from data to noise")
    flow.add_argument("--likelihood", action="store_true",
                      help="ode: also print the samples' bits per dimension (needs --cfg-scale 1)")
    flow.add_argument("--diffusion-form", choices=DIFFUSION_FORMS, default=None,
                      help="sde: the diffusion coefficient's form (default sigma)")
    flow.add_argument("--diffusion-norm", type=float, default=None, help="sde: its scale (default 1.0)")
    flow.add_argument("--last-step", choices=["None", "Mean", "Tweedie", "Euler"], default=None,
                      help="sde: the last, noise-free step (default Mean)")
    flow.add_argument("--last-step-size", type=float, default=None, help="sde: its size (default 0.04)")
    interval = group.add_mutually_exclusive_group()
    interval.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                          help="guide only at timesteps t with LO <= t/1000 <= HI (t/1000 = 1: pure noise), "
                               "e.g. 0 0.7; elsewhere one unguided forward (default: guide at every step). "
                               "A SiT: LO <= t <= HI in its time (t = 1: data)")
    interval.add_argument("--cfg-interval-sigma", type=float, nargs=2, metavar=("SIGMA_LO", "SIGMA_HI"), default=None,
                          help="the same in noise levels sigma = sqrt((1 - alpha_bar) / alpha_bar), the unit of "
                               "Kynkaanniemi et al. (docs/sampling.md has the table)")
