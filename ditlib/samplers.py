"""Sampling: one entry point, generate(), that every command uses; the samplers it runs (for a DiT:
IDDPM ancestral and DDIM, diffusers' DPM-Solver++ and UniPC; for a SiT: its ODE and SDE);
classifier-free guidance, optionally only in an interval of noise levels or times; and the settings
that choose them (SamplingSettings)."""
import math
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch

from diffusion import create_diffusion
from ditlib.errors import SettingError
from transport import DIFFUSION_FORMS, Transport, sample_ode, sample_sde

SAMPLERS = ("ddpm", "ddim", "dpm++", "unipc")
ODE_SOLVERS = ("dpm++", "unipc")
FLOW_SAMPLERS = ("ode", "sde")  # SiT's two modes
SDE_METHODS = ("Euler", "Heun")
LAST_STEPS = (None, "Mean", "Tweedie", "Euler")


class Sampler:
    """One sampler at one step count: the respaced IDDPM diffusion it walks (ddpm: evenly strided
    steps, ddim: DDIM's stride) or, for an ODE solver, its diffusers scheduler with DiT's own betas.
    Built before any work, so a bad step count is an error naming the setting num_sampling_steps."""

    time_unit = 1000  # the model's timesteps run 0..999; a guidance interval is given in t/1000

    def __init__(self, name: str, steps: int, eta: float = 0.0):
        if name not in SAMPLERS:
            raise SettingError("sampler", f"must be one of {', '.join(SAMPLERS)}, got {name!r}")
        if steps < 2:  # the learned variance at the last step is interpolated towards the second step's
            raise SettingError("num_sampling_steps", f"must be at least 2 for DiT's learned-variance sampling, "
                                                     f"got {steps}")
        self.name, self.steps, self.eta = name, steps, eta
        if name in ODE_SOLVERS:
            self.scheduler = ode_scheduler(name, steps)
            distinct = len(set(self.scheduler.timesteps.tolist()))
            if distinct < steps:  # diffusers' spacing repeats a timestep: a zero step, and NaN everywhere
                raise SettingError("num_sampling_steps", f"{steps}: --sampler {name} visits only {distinct} "
                                                         f"distinct timesteps at this count (a repeated one "
                                                         f"gives NaN images); use at most "
                                                         f"{max_ode_steps(name)} steps")
        else:
            try:
                self.diffusion = create_diffusion(f"ddim{steps}" if name == "ddim" else str(steps))
            except ValueError as error:
                raise SettingError("num_sampling_steps", f"{steps}: {error}") from None

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


class FlowSampler:
    """SiT's samplers on a transport: the probability flow ODE (any torchdiffeq method; adaptive
    ones report num_sampling_steps points) or the SDE (Euler-Maruyama or Heun, num_sampling_steps
    - 1 steps and a last step), with SiT's options and defaults. Nothing is clipped, as in SiT."""

    time_unit = 1  # the transport's time: 0 noise, 1 data

    def __init__(self, transport: Transport, name: str, steps: int, method: Optional[str] = None,
                 atol: float = 1e-6, rtol: float = 1e-3, reverse: bool = False, diffusion_form: str = "sigma",
                 diffusion_norm: float = 1.0, last_step: Optional[str] = "Mean", last_step_size: float = 0.04):
        if name not in FLOW_SAMPLERS:
            raise SettingError("sampler", f"must be ode or sde for a SiT model, got {name!r}")
        if steps < 2:  # the time grid needs its two ends
            raise SettingError("num_sampling_steps", f"must be at least 2, got {steps}")
        method = method or ("dopri5" if name == "ode" else "Euler")
        if name == "ode" and method not in ode_methods():
            raise SettingError("sampling_method", f"{method!r} is not a torchdiffeq method; choose from "
                                                  f"{', '.join(ode_methods())}")
        if name == "sde" and method not in SDE_METHODS:
            raise SettingError("sampling_method", f"must be Euler or Heun for the SDE, got {method!r}")
        if diffusion_form not in DIFFUSION_FORMS:
            raise SettingError("diffusion_form", f"must be one of {', '.join(DIFFUSION_FORMS)}, got "
                                                 f"{diffusion_form!r}")
        if last_step not in LAST_STEPS:
            raise SettingError("last_step", f"must be None, Mean, Tweedie or Euler, got {last_step!r}")
        for setting, value in (("atol", atol), ("rtol", rtol), ("diffusion_norm", diffusion_norm)):
            if not (math.isfinite(value) and value > 0):
                raise SettingError(setting, f"must be a positive number, got {value}")
        if not 0 <= last_step_size < 1:
            raise SettingError("last_step_size", f"must lie in [0, 1), got {last_step_size}")
        if name == "sde" and diffusion_form == "SBDM" and transport.path_type != "VP" \
                and transport.interval(sde=True, sampling=True)[0] == 0:
            raise SettingError("diffusion_form", f"SBDM divides by t, and a {transport.prediction} model on the "
                                                 f"{transport.path_type} path starts at t = 0 (sample_eps 0): every "
                                                 f"sample would be NaN, as in SiT; choose another form")
        if reverse and name != "ode":
            raise SettingError("reverse", "applies to --sampler ode only")
        self.transport, self.name, self.steps, self.method = transport, name, steps, method
        self.atol, self.rtol, self.reverse = atol, rtol, reverse
        self.diffusion_form, self.diffusion_norm = diffusion_form, diffusion_norm
        self.last_step, self.last_step_size = last_step, last_step_size

    def timesteps(self) -> list[float]:
        """The times of the sampler's grid (an adaptive ODE method evaluates the model between them)."""
        if self.name == "ode":
            t0, t1 = self.transport.interval(sampling=True, reverse=self.reverse)
        else:
            t0, t1 = self.transport.interval(sde=True, sampling=True, diffusion_form=self.diffusion_form,
                                             last_step_size=self.last_step_size if self.last_step else 0.0)
        return torch.linspace(t0, t1, self.steps).tolist()

    def run(self, model_fn, x: torch.Tensor, model_kwargs: dict, progress: bool = False,
            pixels: bool = False) -> torch.Tensor:
        if self.name == "ode":
            return sample_ode(self.transport, model_fn, x, model_kwargs, self.method, self.steps, self.atol,
                              self.rtol, self.reverse)
        return sample_sde(self.transport, model_fn, x, model_kwargs, self.method, self.diffusion_form,
                          self.diffusion_norm, self.last_step, self.last_step_size, self.steps, progress)


def ode_methods() -> list:
    """torchdiffeq's solver names (its fixed-step and adaptive methods)."""
    from torchdiffeq._impl.odeint import SOLVERS
    return sorted(SOLVERS)


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
        model_fn = model.forward_with_cfg if interval is None else \
            guided_in_interval(model, *interval, time_unit=sampler.time_unit)
        kwargs = dict(y=y, cfg_scale=cfg_scale, guide_all_channels=guide_all_channels)
        return sampler.run(model_fn, x, kwargs, progress, pixels)[: len(noise)]
    return sampler.run(model.forward, noise, dict(y=labels), progress, pixels)


def guided_in_interval(model, low: float, high: float, time_unit: float = 1000):
    """forward_with_cfg at times t with low <= t/time_unit <= high; elsewhere one unguided forward
    of the conditional half, copied to both halves (half the work). Guidance at the noisiest steps
    mostly narrows the variety of samples; there a plain forward is enough (Kynkaanniemi et al.
    2024). DiT's t/1000 = 1 is pure noise; a SiT's t = 0 is."""
    def model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                 guide_all_channels: bool = False) -> torch.Tensor:
        if low <= float(t[0]) / time_unit <= high:  # every sampler calls the model at one time per batch
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
        raise SettingError("cfg_interval_sigma", f"{sigma_low} {sigma_high} holds no timestep: DiT's noise levels "
                                                 f"run from sigma {sigmas[0]:.4f} (t=0) to {sigmas[-1]:.1f} (t=999)")
    return float(inside[0]) / 1000, float(inside[-1]) / 1000


# ---- the settings ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingSettings:
    """The sampler, its step count and the guidance of sample.py and sample_ddp.py (the fields are
    their flags' names). The interval is given in t/1000 or in sigma, not both (for a SiT: in its
    time t). The SiT samplers' options are None unless given, so a DiT refuses them by name."""
    sampler: Optional[str] = None  # None: ddpm for a DiT, sde for a SiT
    num_sampling_steps: int = 250
    cfg_scale: float = 4.0
    eta: float = 0.0
    cfg_interval: Optional[tuple[float, float]] = None
    cfg_interval_sigma: Optional[tuple[float, float]] = None
    cfg_channels: str = "3"  # "all": guide every latent channel, as diffusers' DiTPipeline
    sampling_method: Optional[str] = None
    atol: Optional[float] = None
    rtol: Optional[float] = None
    reverse: bool = False
    likelihood: bool = False
    diffusion_form: Optional[str] = None
    diffusion_norm: Optional[float] = None
    last_step: Optional[str] = None
    last_step_size: Optional[float] = None

    FLOW_OPTIONS = ("sampling_method", "atol", "rtol", "diffusion_form", "diffusion_norm", "last_step",
                    "last_step_size")

    @property
    def guide_all_channels(self) -> bool:
        return self.cfg_channels == "all"

    def interval(self) -> Optional[tuple[float, float]]:
        """The guidance interval in the sampler's time (None: guide at every step)."""
        if self.cfg_interval_sigma is not None:
            return interval_from_sigma(*self.cfg_interval_sigma)
        return (float(self.cfg_interval[0]), float(self.cfg_interval[1])) if self.cfg_interval is not None else None

    def name(self, flow: bool) -> str:
        return self.sampler or ("sde" if flow else "ddpm")

    def check(self, min_cfg_scale: float) -> None:
        """Every setting checked before any work (before the model is known): for a SiT's samplers
        when ode, sde or their options are asked for, else for a DiT's; build() with the model's
        transport then gives the sampler."""
        if self.sampler is not None:
            self.build(min_cfg_scale, Transport() if self.sampler in FLOW_SAMPLERS else None)
            return
        ode = self.reverse or self.likelihood or self.atol is not None or self.rtol is not None
        sde = any(getattr(self, option) is not None for option in self.FLOW_OPTIONS if option not in ("atol", "rtol"))
        if ode or sde:  # SiT options without --sampler: the mode they belong to
            replace(self, sampler="ode" if ode else "sde").build(min_cfg_scale, Transport())
        else:
            self.build(min_cfg_scale)

    def build(self, min_cfg_scale: float, transport: Optional[Transport] = None):
        """The sampler these settings ask for (a SiT's when a transport is given), every setting
        checked before any work."""
        name = self.name(transport is not None)
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise SettingError("eta", f"must be >= 0 (0: deterministic DDIM, 1: DDPM-like noise), got {self.eta}")
        if self.eta != 0 and name != "ddim":
            raise SettingError("eta", f"{self.eta} only applies to --sampler ddim (--sampler {name} ignores it)")
        if transport is None:
            if name in FLOW_SAMPLERS:
                raise SettingError("sampler", f"{name} samples a SiT (a flow); a DiT takes {', '.join(SAMPLERS)}")
            given = [o for o in (*self.FLOW_OPTIONS, "reverse", "likelihood") if getattr(self, o) not in (None, False)]
            if given:
                raise SettingError(given[0], "applies to SiT models only (--sampler ode or sde)")
            sampler = Sampler(name, self.num_sampling_steps, self.eta)
        else:
            if name in SAMPLERS:
                raise SettingError("sampler", f"{name} samples a DiT; a SiT takes ode or sde")
            if self.cfg_interval_sigma is not None:
                raise SettingError("cfg_interval_sigma", "is in DiT's noise levels; give a SiT's interval "
                                                         "with --cfg-interval in its time t (1: data)")
            options = {o: getattr(self, o) for o in self.FLOW_OPTIONS if getattr(self, o) is not None}
            if name == "ode":
                wrong = [o for o in ("diffusion_form", "diffusion_norm", "last_step", "last_step_size")
                         if o in options]
            else:
                wrong = [o for o in ("atol", "rtol") if o in options] + (["likelihood"] if self.likelihood else [])
            if wrong:
                raise SettingError(wrong[0], f"does not apply to --sampler {name}")
            options["method"] = options.pop("sampling_method", None)
            if options.get("last_step") == "None":
                options["last_step"] = None
            sampler = FlowSampler(transport, name, self.num_sampling_steps, reverse=self.reverse, **options)
        check_guidance(self.cfg_scale, self.interval(), sampler, min_cfg_scale)
        return sampler


def check_guidance(cfg_scale: float, interval: Optional[tuple[float, float]], sampler, min_cfg_scale: float) -> None:
    """A guidance scale that is a number in range, and an interval that guides at least one sampled step."""
    if not (math.isfinite(cfg_scale) and cfg_scale >= min_cfg_scale):
        raise SettingError("cfg_scale", f"must be a number >= {min_cfg_scale} (1.0 turns guidance off), got "
                                        f"{cfg_scale}")
    if interval is None:
        return
    low, high = interval
    unit = "fractions of the 1000 timesteps" if sampler.time_unit == 1000 else "the SiT's time t, 1: data"
    if not (0 <= low <= high <= 1):
        raise SettingError("cfg_interval", f"LO HI needs 0 <= LO <= HI <= 1 ({unit}), got {low} {high}")
    if not any(low <= t / sampler.time_unit <= high for t in sampler.timesteps()):
        where = "in t/1000" if sampler.time_unit == 1000 else "in the SiT's time t"
        raise ValueError(f"the guidance interval [{low}, {high}] ({where}) holds none of the {sampler.steps} "
                         f"timesteps {sampler.name} samples at, so nothing would be guided; widen it")
