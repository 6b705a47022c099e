"""Sampling: one entry point, generate(), that every script uses; the samplers it runs (IDDPM
ancestral and DDIM, diffusers' DPM-Solver++ and UniPC); classifier-free guidance, optionally only
in an interval of noise levels; and the sampler flags the scripts share."""
import argparse
import math
from typing import Optional

import numpy as np
import torch

from diffusion import create_diffusion

SAMPLERS = ("ddpm", "ddim", "dpm++", "unipc")
ODE_SOLVERS = ("dpm++", "unipc")


class Sampler:
    """One sampler at one step count: the respaced IDDPM diffusion it walks (ddpm: evenly strided
    steps, ddim: DDIM's stride) or, for an ODE solver, its diffusers scheduler with DiT's own betas.
    Built before any work, so a bad step count is an error naming `flag`."""

    def __init__(self, name: str, steps: int, eta: float = 0.0, flag: str = "--num-sampling-steps"):
        if name not in SAMPLERS:
            raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")
        if steps < 2:  # the learned variance at the last step is interpolated towards the second step's
            raise ValueError(f"{flag} must be at least 2 for DiT's learned-variance sampling, got {steps}")
        self.name, self.steps, self.eta = name, steps, eta
        if name in ODE_SOLVERS:
            self.scheduler = ode_scheduler(name, steps)
            distinct = len(set(self.scheduler.timesteps.tolist()))
            if distinct < steps:  # diffusers' spacing repeats a timestep: a zero step, and NaN everywhere
                raise ValueError(f"{flag} {steps}: --sampler {name} visits only {distinct} distinct timesteps at this "
                                 f"count (a repeated one gives NaN images); use at most {max_ode_steps(name)} steps")
        else:
            try:
                self.diffusion = create_diffusion(f"ddim{steps}" if name == "ddim" else str(steps))
            except ValueError as error:
                raise ValueError(f"{flag} {steps}: {error}") from None

    def timesteps(self) -> list[int]:
        """The original timesteps (0..999) at which the model is called, noisiest first."""
        if self.name in ODE_SOLVERS:
            return [int(t) for t in self.scheduler.timesteps]
        return sorted(self.diffusion.timestep_map, reverse=True)

    def run(self, model_fn, x: torch.Tensor, model_kwargs: dict, progress: bool = False,
            pixels: bool = False) -> torch.Tensor:
        """Sample from the noise x. Latents are not clipped (as in DiT); pixel-space predictions of
        x_0 are clipped to [-1, 1], as pixel diffusion models do."""
        common = dict(clip_denoised=pixels, model_kwargs=model_kwargs, progress=progress, device=x.device)
        if self.name == "ddpm":
            return self.diffusion.p_sample_loop(model_fn, x.shape, x, **common)
        if self.name == "ddim":
            return self.diffusion.ddim_sample_loop(model_fn, x.shape, x, eta=self.eta, **common)
        return solve_ode(self.scheduler, model_fn, x, model_kwargs, progress, pixels)


@torch.no_grad()
def generate(model, sampler: Sampler, noise: torch.Tensor, labels: torch.Tensor, cfg_scale: float,
             guided: Optional[bool] = None, interval: Optional[tuple[float, float]] = None,
             progress: bool = False, pixels: bool = False, guide_all_channels: bool = False) -> torch.Tensor:
    """Samples (latents, or pixels in [-1, 1] for a pixel-space model) for these noises and labels:
    the sequence of the official scripts. Guided by default when cfg_scale > 1 (as sample_ddp.py
    decides; sample.py always guides): the batch is doubled with the null class (model.num_classes),
    model.forward_with_cfg combines the halves (on the first 3 channels, as the official code, or on
    all of them), with an interval only at the timesteps inside it, and the conditional half is
    returned. Otherwise plain model.forward."""
    if guided if guided is not None else cfg_scale > 1.0:
        x = torch.cat([noise, noise], 0)
        y = torch.cat([labels, torch.full_like(labels, model.num_classes)], 0)
        model_fn = model.forward_with_cfg if interval is None else guided_in_interval(model, *interval)
        kwargs = dict(y=y, cfg_scale=cfg_scale, guide_all_channels=guide_all_channels)
        return sampler.run(model_fn, x, kwargs, progress, pixels)[: len(noise)]
    return sampler.run(model.forward, noise, dict(y=labels), progress, pixels)


def guided_in_interval(model, low: float, high: float):
    """forward_with_cfg at timesteps t with low <= t/1000 <= high; elsewhere one unguided forward of
    the conditional half, copied to both halves (half the work). Guidance at the noisiest steps
    mostly narrows the variety of samples; there a plain forward is enough (Kynkaanniemi et al. 2024)."""
    def model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                 guide_all_channels: bool = False) -> torch.Tensor:
        if low <= float(t[0]) / 1000 <= high:  # every sampler calls the model with one timestep per batch
            return model.forward_with_cfg(x, t, y, cfg_scale, guide_all_channels)
        half = len(x) // 2
        out = model.forward(x[:half], t[:half], y[:half])
        return torch.cat([out, out], 0)
    return model_fn


class NoNetwork:
    """A stand-in model whose output is zeros: sampling with it draws exactly the random numbers
    that sampling with the real model would (same order and shapes), without the network's work."""

    def __init__(self, num_classes: int, out_channels: int):
        self.num_classes, self.out_channels = num_classes, out_channels

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.zeros(x.shape[0], self.out_channels, *x.shape[2:], device=x.device)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guide_all_channels: bool = False) -> torch.Tensor:
        return self.forward(x, t, y)


def ode_scheduler(name: str, steps: int):
    """DPM-Solver++(2M) (the variant diffusers' DiT documentation swaps in) or UniPC (bh2, order 2),
    timesteps spaced as diffusers does (linspace from 999), the last step to noise level zero."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    betas = create_diffusion("").betas.tolist()  # DiT's linear schedule, exactly
    common = dict(num_train_timesteps=len(betas), trained_betas=betas, prediction_type="epsilon", solver_order=2)
    if name == "dpm++":
        scheduler = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", final_sigmas_type="zero")
    else:
        scheduler = UniPCMultistepScheduler(**common, solver_type="bh2", final_sigmas_type="zero")
    scheduler.set_timesteps(steps)
    return scheduler


def max_ode_steps(name: str) -> int:
    """The largest step count at which diffusers' spacing gives every step its own timestep."""
    scheduler, low, high = ode_scheduler(name, 2), 2, 1000
    while low < high:  # distinct counts only fall behind once, then stay behind
        middle = (low + high + 1) // 2
        scheduler.set_timesteps(middle)
        low, high = (middle, high) if len(set(scheduler.timesteps.tolist())) == middle else (low, middle - 1)
    return low


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


# ---- noise levels: the guidance interval in t/1000 or in sigma -----------------------------------

def noise_levels() -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for t = 0..999 on DiT's linear schedule: the
    noise-to-signal ratio in which Kynkaanniemi et al. define guidance intervals."""
    alphas_cumprod = create_diffusion("").alphas_cumprod
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


def interval_from_sigma(sigma_low: float, sigma_high: float) -> tuple[float, float]:
    """The t/1000 interval holding exactly the timesteps whose sigma lies in [sigma_low, sigma_high]."""
    sigmas = noise_levels()
    inside = np.nonzero((sigmas >= sigma_low) & (sigmas <= sigma_high))[0]
    if len(inside) == 0:
        raise ValueError(f"--cfg-interval-sigma {sigma_low} {sigma_high} holds no timestep: DiT's noise levels "
                         f"run from sigma {sigmas[0]:.4f} (t=0) to {sigmas[-1]:.1f} (t=999)")
    return float(inside[0]) / 1000, float(inside[-1]) / 1000


# ---- the flags ------------------------------------------------------------------------------------

def add_sampler_flags(parser: argparse.ArgumentParser, cfg_scale: float) -> None:
    """The sampler group of sample.py and sample_ddp.py (official names and defaults first)."""
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


def guidance_interval(args: argparse.Namespace) -> Optional[tuple[float, float]]:
    """The guidance interval in t/1000, from whichever of the two interval flags was given."""
    if getattr(args, "cfg_interval_sigma", None) is not None:
        return interval_from_sigma(*args.cfg_interval_sigma)
    return (float(args.cfg_interval[0]), float(args.cfg_interval[1])) if args.cfg_interval is not None else None


def check_guidance(cfg_scale: float, interval: Optional[tuple[float, float]], sampler: Sampler, flag: str,
                   min_cfg_scale: float) -> None:
    """A guidance scale that is a number in range, and an interval that guides at least one sampled step."""
    if not (math.isfinite(cfg_scale) and cfg_scale >= min_cfg_scale):
        raise ValueError(f"{flag} must be a number >= {min_cfg_scale} (1.0 turns guidance off), got {cfg_scale}")
    if interval is None:
        return
    low, high = interval
    if not (0 <= low <= high <= 1):
        raise ValueError(f"--cfg-interval LO HI needs 0 <= LO <= HI <= 1 (fractions of the 1000 timesteps), "
                         f"got {low} {high}")
    if not any(low <= t / 1000 <= high for t in sampler.timesteps()):
        raise ValueError(f"the guidance interval [{low}, {high}] (in t/1000) holds none of the {sampler.steps} "
                         f"timesteps {sampler.name} samples at, so nothing would be guided; widen it")


def sampler_from_flags(args: argparse.Namespace, min_cfg_scale: float) -> Sampler:
    """The sampler the flags ask for, every sampler flag checked before any work."""
    if not (math.isfinite(args.eta) and args.eta >= 0):
        raise ValueError(f"--eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like noise), got {args.eta}")
    if args.eta != 0 and args.sampler != "ddim":
        raise ValueError(f"--eta {args.eta} only applies to --sampler ddim (--sampler {args.sampler} ignores it)")
    sampler = Sampler(args.sampler, args.num_sampling_steps, args.eta)
    check_guidance(args.cfg_scale, guidance_interval(args), sampler, "--cfg-scale", min_cfg_scale)
    return sampler
