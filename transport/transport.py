"""SiT's transport: the flow-matching objective on an interpolant, and its samplers (the probability
flow ODE through torchdiffeq, Euler-Maruyama or Heun for the SDE, and the ODE's likelihood).

The model is called as model(x, t, **kwargs) with t in [0, 1] (0: noise, 1: data). Random numbers
are drawn in SiT's order and on SiT's generators, so a seeded run gives SiT's samples."""
import math
from typing import Callable, Optional

import numpy as np
import torch

from transport.path import PATHS, expand_t_like_x

PREDICTIONS = ("velocity", "score", "noise")
LOSS_WEIGHTS = (None, "velocity", "likelihood")


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return torch.mean(x, dim=list(range(1, x.dim())))


class Transport:
    """An interpolant (path_type) and what the model predicts on it, with the eps that keep the
    training and sampling times away from the path's singular ends."""

    def __init__(self, path_type: str = "Linear", prediction: str = "velocity",
                 loss_weight: Optional[str] = None, train_eps: float = 0.0, sample_eps: float = 0.0):
        self.path_type, self.prediction, self.loss_weight = path_type, prediction, loss_weight
        self.path = PATHS[path_type]()
        self.train_eps, self.sample_eps = train_eps, sample_eps

    def interval(self, sde: bool = False, sampling: bool = False, diffusion_form: str = "SBDM",
                 last_step_size: float = 0.0, reverse: bool = False) -> tuple[float, float]:
        """(t0, t1): where training draws t, or where a sampler starts and stops (SiT's rules)."""
        t0, t1 = 0, 1
        eps = self.sample_eps if sampling else self.train_eps
        last = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
        if self.path_type == "VP":
            t1 = last
        elif self.prediction != "velocity" or sde:  # a first semi-implicit step avoids the singular end
            t0 = eps if (diffusion_form == "SBDM" and sde) or self.prediction != "velocity" else 0
            t1 = last
        return (1 - t0, 1 - t1) if reverse else (t0, t1)

    def training_losses(self, model, x1: torch.Tensor, model_kwargs: Optional[dict] = None,
                        noise: Optional[torch.Tensor] = None, t: Optional[torch.Tensor] = None) -> dict:
        """{"loss": (N,)}: SiT's objective for the data x1. The noise x0 and the times t are drawn
        as SiT draws them (randn_like, then torch.rand on the CPU) unless given."""
        x0 = torch.randn_like(x1) if noise is None else noise
        if t is None:
            t = self.training_times(len(x1)).to(x1)
        xt, ut = self.path.plan(t, x0, x1)
        output = model(xt, t, **(model_kwargs or {}))
        if output.shape != xt.shape:
            raise ValueError(f"the model's output {tuple(output.shape)} does not match x_t {tuple(xt.shape)}")
        if self.prediction == "velocity":
            return {"loss": mean_flat((output - ut) ** 2)}
        _, drift_var = self.path.drift(xt, t)
        sigma_t, _ = self.path.sigma(expand_t_like_x(t, xt))
        weight = {"velocity": lambda: (drift_var / sigma_t) ** 2,
                  "likelihood": lambda: drift_var / (sigma_t ** 2), None: lambda: 1}[self.loss_weight]()
        if self.prediction == "noise":
            return {"loss": mean_flat(weight * ((output - x0) ** 2))}
        return {"loss": mean_flat(weight * ((output * sigma_t + x0) ** 2))}

    def training_times(self, batch: int) -> torch.Tensor:
        """t for a batch, uniform in the training interval, drawn on the CPU generator (as SiT)."""
        t0, t1 = self.interval()
        return torch.rand((batch,)) * (t1 - t0) + t0

    def velocity_and_score(self, model_fn: Callable, x: torch.Tensor, t: torch.Tensor,
                           kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(drift of the probability flow ODE, score) from one network evaluation. SiT evaluates
        the network once for each; both give the same numbers."""
        output = model_fn(x, t, **kwargs)
        if self.prediction == "velocity":
            return output, self.path.score_from_velocity(output, x, t)
        drift_mean, drift_var = self.path.drift(x, t)
        if self.prediction == "noise":
            score = output / -self.path.sigma(expand_t_like_x(t, x))[0]
        else:
            score = output
        return -drift_mean + drift_var * score, score

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, I) per sample, in SiT's float32 arithmetic."""
        dims = torch.prod(torch.tensor(z.size())[1:])
        return torch.vmap(lambda one: -dims / 2.0 * np.log(2 * np.pi) - torch.sum(one ** 2) / 2.0)(z)


def create_transport(path_type: str = "Linear", prediction: str = "velocity", loss_weight: Optional[str] = None,
                     train_eps: Optional[float] = None, sample_eps: Optional[float] = None) -> Transport:
    """SiT's create_transport: its defaults and its rules for the eps values (none near the ends for
    velocity on Linear or GVP, where the flow is regular; 1e-3 otherwise, 1e-5 for training on VP).
    As in SiT, a sample_eps given without train_eps is replaced by the default."""
    if path_type not in PATHS:
        raise ValueError(f"path_type must be one of {', '.join(PATHS)}, got {path_type!r}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
    if loss_weight not in LOSS_WEIGHTS:
        raise ValueError(f"loss_weight must be None, velocity or likelihood, got {loss_weight!r}")
    if path_type == "VP":
        train_eps, sample_eps = (1e-5, 1e-3) if train_eps is None else (train_eps, sample_eps)
    elif prediction != "velocity":
        train_eps, sample_eps = (1e-3, 1e-3) if train_eps is None else (train_eps, sample_eps)
    else:
        train_eps, sample_eps = 0, 0
    return Transport(path_type, prediction, loss_weight, train_eps, sample_eps)


# ---- samplers ----------------------------------------------------------------------------------

def sample_ode(transport: Transport, model_fn: Callable, x: torch.Tensor, kwargs: dict,
               sampling_method: str = "dopri5", num_steps: int = 50, atol: float = 1e-6, rtol: float = 1e-3,
               reverse: bool = False) -> torch.Tensor:
    """The probability flow ODE from x at t0 to t1 with a torchdiffeq method (fixed-step methods
    take num_steps - 1 steps; adaptive ones report num_steps points); the end point."""
    from torchdiffeq import odeint

    t0, t1 = transport.interval(sampling=True, reverse=reverse)

    def drift(t, x):
        return ode_drift(transport, model_fn, x, torch.ones(x.size(0)).to(x.device) * t, kwargs)

    times = torch.linspace(t0, t1, num_steps).to(x.device)
    return odeint(drift, x, times, method=sampling_method, atol=[atol], rtol=[rtol])[-1]


def sample_sde(transport: Transport, model_fn: Callable, x: torch.Tensor, kwargs: dict,
               sampling_method: str = "Euler", diffusion_form: str = "sigma", diffusion_norm: float = 1.0,
               last_step: Optional[str] = "Mean", last_step_size: float = 0.04, num_steps: int = 250,
               progress: bool = False) -> torch.Tensor:
    """The reverse SDE dx = [v + w_t s] dt + sqrt(2 w_t) dW from t0 to t1 in num_steps - 1 steps
    (one torch.randn of x's shape on the CPU generator each), then one deterministic last step."""
    from tqdm.auto import tqdm

    if last_step is None:
        last_step_size = 0.0
    t0, t1 = transport.interval(sde=True, sampling=True, diffusion_form=diffusion_form,
                                last_step_size=last_step_size)
    times = torch.linspace(t0, t1, num_steps)
    dt = times[1] - times[0]
    path = transport.path

    def sde_drift(x, t):
        velocity, score = transport.velocity_and_score(model_fn, x, t, kwargs)
        return velocity + path.diffusion(x, t, diffusion_form, diffusion_norm) * score

    for time in tqdm(times[:-1], disable=not progress):
        dw = torch.randn(x.size()).to(x) * torch.sqrt(dt)
        t = torch.ones(x.size(0)).to(x) * time
        if sampling_method == "Euler":
            mean_x = x + sde_drift(x, t) * dt
            x = mean_x + torch.sqrt(2 * path.diffusion(x, t, diffusion_form, diffusion_norm)) * dw
        else:  # Heun: noise first, then the trapezoid on the noised point
            x_hat = x + torch.sqrt(2 * path.diffusion(x, t, diffusion_form, diffusion_norm)) * dw
            k1 = sde_drift(x_hat, t)
            k2 = sde_drift(x_hat + dt * k1, t + dt)
            x = x_hat + 0.5 * dt * (k1 + k2)
    t = torch.ones(x.size(0), device=x.device) * t1
    if last_step == "Mean":
        return x + sde_drift(x, t) * last_step_size
    if last_step == "Euler":
        return x + transport.velocity_and_score(model_fn, x, t, kwargs)[0] * last_step_size
    if last_step == "Tweedie":
        alpha, sigma = path.alpha(t)[0][0], path.sigma(t)[0][0]
        return x / alpha + (sigma ** 2) / alpha * transport.velocity_and_score(model_fn, x, t, kwargs)[1]
    return x


def ode_likelihood(transport: Transport, model_fn: Callable, x: torch.Tensor, kwargs: dict,
                   sampling_method: str = "dopri5", num_steps: int = 50, atol: float = 1e-6,
                   rtol: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(x) in nats per sample, the noise x maps to): the ODE from data back to noise with
    Hutchinson's trace estimate (one Rademacher probe per evaluation), as SiT computes it."""
    from torchdiffeq import odeint

    t0, t1 = transport.interval(sampling=True)

    def drift(t, state):
        z, _ = state
        t = torch.ones(z.size(0)).to(z.device) * t
        probe = torch.randint(2, z.size(), dtype=torch.float, device=z.device) * 2 - 1
        t = torch.ones_like(t) * (1 - t)
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            grad = torch.autograd.grad(torch.sum(ode_drift(transport, model_fn, z, t, kwargs) * probe), z)[0]
            divergence = torch.sum(grad * probe, dim=tuple(range(1, z.dim())))
            velocity = ode_drift(transport, model_fn, z, t, kwargs)
        return -velocity, divergence

    times = torch.linspace(t0, t1, num_steps).to(x.device)
    zs, delta = odeint(drift, (x, torch.zeros(x.size(0)).to(x)), times, method=sampling_method,
                       atol=[atol, atol], rtol=[rtol, rtol])
    return transport.prior_logp(zs[-1]) - delta[-1], zs[-1]


def ode_drift(transport: Transport, model_fn: Callable, x: torch.Tensor, t: torch.Tensor,
              kwargs: dict) -> torch.Tensor:
    if transport.prediction == "velocity":
        return model_fn(x, t, **kwargs)
    return transport.velocity_and_score(model_fn, x, t, kwargs)[0]


def bits_per_dim(logp: torch.Tensor, dims: int) -> torch.Tensor:
    """-log2 p(x) / D."""
    return -logp / (dims * math.log(2))
