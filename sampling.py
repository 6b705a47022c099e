"""Sampling: the samplers (IDDPM ancestral and DDIM, diffusers' DPM-Solver++ and UniPC), guidance
(classifier-free, optionally in an interval) and the flags the sampling scripts share."""
import argparse
from typing import Optional

import torch

from diffusion import create_diffusion
from models import BLOCK_DESIGNS


def add_sampling_flags(group) -> None:
    """Flags sample.py and sample_ddp.py share beyond the official ones."""
    group.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                       help="ddpm: ancestral (official); ddim; dpm++: DPM-Solver++(2M); unipc: UniPC (bh2, order 2)")
    group.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0: deterministic)")
    group.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                       help="guide only at timesteps t with LO <= t/1000 <= HI (1: pure noise), e.g. 0 0.7; "
                            "elsewhere one unguided forward (default: guide at every step)")
    group.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights of a train.py checkpoint")
    group.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    group.add_argument("--block", choices=BLOCK_DESIGNS, default=None,
                       help="block design (default: the checkpoint's, else read from its weights)")


def check_sampling_flags(args: argparse.Namespace, min_cfg_scale: float) -> None:
    """The shared sampling flags' ranges, checked before any work (flags are named in the error; the
    step count is checked where the respaced diffusion is built, sampling_diffusion)."""
    if args.eta < 0:
        raise ValueError(f"--eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like noise), got {args.eta}")
    if args.cfg_scale < min_cfg_scale:
        raise ValueError(f"--cfg-scale must be >= {min_cfg_scale} (1.0 turns guidance off), got {args.cfg_scale}")
    if args.cfg_interval is not None and not 0 <= args.cfg_interval[0] <= args.cfg_interval[1] <= 1:
        raise ValueError(f"--cfg-interval LO HI needs 0 <= LO <= HI <= 1 (fractions of the 1000 timesteps), "
                         f"got {' '.join(map(str, args.cfg_interval))}")


def guided_batch(noise: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg_scale: float, model,
                 guided: Optional[bool] = None, interval: Optional[tuple[float, float]] = None):
    """(x, model_fn, model_kwargs) for one sampling batch. Guided (by default when cfg_scale > 1, as
    sample_ddp.py decides; sample.py always guides): the batch is doubled with the null class (index
    num_classes) and model.forward_with_cfg combines the halves; with an interval only at the
    timesteps inside it (guided_in_interval). Otherwise plain model.forward."""
    if guided if guided is not None else cfg_scale > 1.0:
        x = torch.cat([noise, noise], 0)
        y = torch.cat([labels, torch.full_like(labels, num_classes)], 0)
        model_fn = model.forward_with_cfg if interval is None else guided_in_interval(model, *interval)
        return x, model_fn, dict(y=y, cfg_scale=cfg_scale)
    return noise, model.forward, dict(y=labels)


def guided_in_interval(model, low: float, high: float):
    """forward_with_cfg at timesteps t with low <= t/1000 <= high; elsewhere one unguided forward of
    the conditional half, copied to both halves (half the work). Guidance at the noisiest steps
    mostly narrows the variety of samples; there a plain forward is enough (Kynkaanniemi et al. 2024)."""
    def model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        if low <= float(t[0]) / 1000 <= high:  # every sampler calls the model with one timestep per batch
            return model.forward_with_cfg(x, t, y, cfg_scale)
        half = len(x) // 2
        out = model.forward(x[:half], t[:half], y[:half])
        return torch.cat([out, out], 0)
    return model_fn


# The samplers: the IDDPM loops of diffusion/ (ancestral: the official choice; DDIM), and two ODE
# solvers of diffusers that use the eps half of the model's output with DiT's own 1000 betas.
SAMPLERS = ("ddpm", "ddim", "dpm++", "unipc")


ODE_SOLVERS = ("dpm++", "unipc")


def sampling_diffusion(sampler: str, steps: int, flag: str = "--num-sampling-steps"):
    """What a sampler walks: the respaced diffusion (evenly strided steps for ddpm, DDIM's stride for
    ddim), or for an ODE solver its diffusers scheduler with DiT's betas and `steps` timesteps."""
    if steps < 2:  # the learned variance at the last step is interpolated towards the second step's
        raise ValueError(f"{flag} must be at least 2 for DiT's learned-variance sampling, got {steps}")
    if sampler in ODE_SOLVERS:
        return ode_scheduler(sampler, steps)
    try:
        return create_diffusion(f"ddim{steps}" if sampler == "ddim" else str(steps))
    except ValueError as error:
        raise ValueError(f"{flag} {steps}: {error}") from None


def ode_scheduler(sampler: str, steps: int):
    """DPM-Solver++(2M) (the variant diffusers' DiT documentation swaps in) or UniPC (bh2, order 2),
    timesteps spaced as diffusers does (linspace from 999), the last step to noise level zero."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    betas = create_diffusion("").betas.tolist()  # DiT's linear schedule, exactly
    common = dict(num_train_timesteps=len(betas), trained_betas=betas, prediction_type="epsilon", solver_order=2)
    if sampler == "dpm++":
        scheduler = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", final_sigmas_type="zero")
    elif sampler == "unipc":
        scheduler = UniPCMultistepScheduler(**common, solver_type="bh2", final_sigmas_type="zero")
    else:
        raise ValueError(f"--sampler {sampler!r} is not an ODE solver ({', '.join(ODE_SOLVERS)})")
    scheduler.set_timesteps(steps)
    return scheduler


def run_sampler(diffusion, sampler: str, model_fn, x: torch.Tensor, model_kwargs: dict, eta: float = 0.0,
                progress: bool = False, pixels: bool = False) -> torch.Tensor:
    """Sample with `diffusion` (from sampling_diffusion). Latents are not clipped (as in DiT);
    pixel-space predictions of x_0 are clipped to [-1, 1], as pixel diffusion models do."""
    common = dict(clip_denoised=pixels, model_kwargs=model_kwargs, progress=progress, device=x.device)
    if sampler == "ddpm":
        return diffusion.p_sample_loop(model_fn, x.shape, x, **common)
    if sampler == "ddim":
        return diffusion.ddim_sample_loop(model_fn, x.shape, x, eta=eta, **common)
    if sampler in ODE_SOLVERS:
        return solve_ode(diffusion, model_fn, x, model_kwargs, progress, pixels)
    raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")


def solve_ode(scheduler, model_fn, x: torch.Tensor, model_kwargs: dict, progress: bool = False,
              pixels: bool = False) -> torch.Tensor:
    """The diffusers sampling loop: eps from the model's first C channels at each of the
    scheduler's timesteps, one solver step each. Draws no random numbers."""
    from tqdm.auto import tqdm

    scheduler.set_timesteps(scheduler.num_inference_steps, device=x.device)  # also clears the solver's history
    alphas_cumprod = scheduler.alphas_cumprod.to(x.device, torch.float64)
    x = x * scheduler.init_noise_sigma
    for t in tqdm(scheduler.timesteps, disable=not progress):
        eps = model_fn(x, torch.full((len(x),), int(t), device=x.device, dtype=torch.long), **model_kwargs)
        eps = eps[:, :x.shape[1]].float()
        if pixels:  # clip the predicted x_0 and give the solver the eps that matches it
            a = alphas_cumprod[int(t)]
            x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
            eps = ((x - a.sqrt() * x0) / (1 - a).sqrt()).float()
        x = scheduler.step(eps, t, x).prev_sample
    return x
