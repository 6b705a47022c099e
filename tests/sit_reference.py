"""SiT's transport as its paper and repository (willisma/SiT) publish it, transcribed plainly for the
tests: one function per quantity, each path's formulas written out, the network called as often as
SiT calls it (twice per SDE drift: once for the velocity, once for the score). The project's
transport/ must give the same numbers, bit for bit."""
import math

import torch
from torchdiffeq import odeint

from models import DiT


def eps_rule(path, prediction, train_eps=None, sample_eps=None):
    """SiT's create_transport: (train_eps, sample_eps)."""
    if path == "VP":
        return (1e-5, 1e-3) if train_eps is None else (train_eps, sample_eps)
    if prediction != "velocity":
        return (1e-3, 1e-3) if train_eps is None else (train_eps, sample_eps)
    return 0, 0


def interval(path, prediction, eps, sde=False, form="SBDM", last_step_size=0.0, reverse=False):
    """SiT's Transport.check_interval."""
    t0, t1 = 0, 1
    if path == "VP":
        t1 = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
    elif prediction != "velocity" or sde:
        t0 = eps if (form == "SBDM" and sde) or prediction != "velocity" else 0
        t1 = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
    if reverse:
        t0, t1 = 1 - t0, 1 - t1
    return t0, t1


def column(t, x):
    return t.view(t.size(0), *([1] * (x.dim() - 1)))


def coefficients(path, t):
    """(alpha, d_alpha, sigma, d_sigma) at t."""
    if path == "Linear":
        return t, 1, 1 - t, -1
    if path == "GVP":
        return (torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2),
                torch.cos(t * math.pi / 2), -math.pi / 2 * torch.sin(t * math.pi / 2))
    low, high = 0.1, 20.0
    log_mean = -0.25 * ((1 - t) ** 2) * (high - low) - 0.5 * (1 - t) * low
    d_log_mean = 0.5 * (1 - t) * (high - low) + 0.5 * low
    alpha = torch.exp(log_mean)
    sigma = torch.sqrt(1 - torch.exp(2 * log_mean))
    return alpha, alpha * d_log_mean, sigma, torch.exp(2 * log_mean) * (2 * d_log_mean) / (-2 * sigma)


def sde_drift_terms(path, x, t):
    """(drift_mean, drift_var) of the forward SDE: compute_drift."""
    t = column(t, x)
    if path == "VP":
        beta = 0.1 + (1 - t) * (20.0 - 0.1)
        return -0.5 * beta * x, beta / 2
    ratio = 1 / t if path == "Linear" else math.pi / (2 * torch.tan(t * math.pi / 2))
    _, _, sigma, d_sigma = coefficients(path, t)
    return -(ratio * x), ratio * (sigma ** 2) - sigma * d_sigma


def diffusion_coefficient(path, x, t, form, norm):
    t = column(t, x)
    return {"constant": lambda: norm * torch.ones_like(t), "SBDM": lambda: norm * sde_drift_terms(path, x, t)[1],
            "sigma": lambda: norm * coefficients(path, t)[2], "linear": lambda: norm * (1 - t),
            "decreasing": lambda: 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2,
            "increasing-decreasing": lambda: norm * torch.sin(math.pi * t) ** 2}[form]()


def probability_flow(path, prediction, model, x, t, kwargs):
    """get_drift: the ODE's right-hand side."""
    out = model(x, t, **kwargs)
    if prediction == "velocity":
        return out
    mean, var = sde_drift_terms(path, x, t)
    if prediction == "noise":
        out = out / -coefficients(path, column(t, x))[2]
    return -mean + var * out


def score(path, prediction, model, x, t, kwargs):
    """get_score."""
    out = model(x, t, **kwargs)
    if prediction == "noise":
        return out / -coefficients(path, column(t, x))[2]
    if prediction == "score":
        return out
    alpha, d_alpha, sigma, d_sigma = coefficients(path, column(t, x))
    ratio = alpha / d_alpha
    return (ratio * out - x) / (sigma ** 2 - ratio * d_sigma * sigma)


def sample_ode(path, prediction, eps, model, x, kwargs, method="dopri5", steps=50, atol=1e-6, rtol=1e-3,
               reverse=False):
    t0, t1 = interval(path, prediction, eps, reverse=reverse)
    grid = torch.linspace(t0, t1, steps).to(x.device)

    def rhs(t, x):
        return probability_flow(path, prediction, model, x, torch.ones(x.size(0)).to(x.device) * t, kwargs)

    return odeint(rhs, x, grid, method=method, atol=[atol], rtol=[rtol])[-1]


def sample_sde(path, prediction, eps, model, x, kwargs, method="Euler", form="sigma", norm=1.0, last_step="Mean",
               last_step_size=0.04, steps=250):
    if last_step is None:
        last_step_size = 0.0
    t0, t1 = interval(path, prediction, eps, sde=True, form=form, last_step_size=last_step_size)
    grid = torch.linspace(t0, t1, steps)
    dt = grid[1] - grid[0]

    def drift(x, t):
        return probability_flow(path, prediction, model, x, t, kwargs) + \
            diffusion_coefficient(path, x, t, form, norm) * score(path, prediction, model, x, t, kwargs)

    for time in grid[:-1]:
        noise = torch.randn(x.size()).to(x)
        t = torch.ones(x.size(0)).to(x) * time
        dw = noise * torch.sqrt(dt)
        if method == "Euler":
            step_drift = drift(x, t)
            step_diffusion = diffusion_coefficient(path, x, t, form, norm)
            x = x + step_drift * dt + torch.sqrt(2 * step_diffusion) * dw
        else:
            x_hat = x + torch.sqrt(2 * diffusion_coefficient(path, x, t, form, norm)) * dw
            k1 = drift(x_hat, t)
            k2 = drift(x_hat + dt * k1, t + dt)
            x = x_hat + 0.5 * dt * (k1 + k2)
    t = torch.ones(x.size(0), device=x.device) * t1
    if last_step == "Mean":
        return x + drift(x, t) * last_step_size
    if last_step == "Euler":
        return x + probability_flow(path, prediction, model, x, t, kwargs) * last_step_size
    if last_step == "Tweedie":
        alpha, _, sigma, _ = coefficients(path, t)
        return x / alpha[0] + (sigma[0] ** 2) / alpha[0] * score(path, prediction, model, x, t, kwargs)
    return x


def training_loss(path, prediction, weighting, train_eps, model, x1, kwargs):
    """Transport.training_losses, drawing x0 then t as SiT does."""
    x0 = torch.randn_like(x1)
    t0, t1 = interval(path, prediction, train_eps)
    t = (torch.rand((x1.shape[0],)) * (t1 - t0) + t0).to(x1)
    alpha, d_alpha, sigma, d_sigma = coefficients(path, column(t, x1))
    xt, ut = alpha * x1 + sigma * x0, d_alpha * x1 + d_sigma * x0
    out = model(xt, t, **kwargs)
    if prediction == "velocity":
        return torch.mean((out - ut) ** 2, dim=list(range(1, x1.dim())))
    _, var = sde_drift_terms(path, xt, t)
    sigma_t = coefficients(path, column(t, xt))[2]
    weight = {"velocity": (var / sigma_t) ** 2, "likelihood": var / (sigma_t ** 2), None: 1}[weighting]
    target = (out - x0) ** 2 if prediction == "noise" else (out * sigma_t + x0) ** 2
    return torch.mean(weight * target, dim=list(range(1, x1.dim())))


def forward_with_cfg(network, x, t, y, cfg_scale, learn_sigma):
    """SiT's forward (the upper half of a learn_sigma output dropped) and its guidance on the first
    three channels, written out over the project's DiT network."""
    def forward(x):
        out = DiT.forward(network, x, t, y)  # the network underneath, all its output channels
        return out.chunk(2, dim=1)[0] if learn_sigma else out

    half = x[: len(x) // 2]
    out = forward(torch.cat([half, half], dim=0))
    eps, rest = out[:, :3], out[:, 3:]
    cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
    guided = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)
