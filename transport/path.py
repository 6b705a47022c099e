"""SiT's interpolants x_t = alpha_t * x1 + sigma_t * x0 between noise x0 (t = 0) and data x1 (t = 1):
their coefficients, the drift and diffusion of the SDE they define, and the score a velocity model
implies. Every expression keeps SiT's order of operations, so samples match SiT's bit for bit."""
import math

import torch


def expand_t_like_x(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N,) times -> (N, 1, ..., 1), broadcastable against x."""
    return t.view(t.size(0), *([1] * (x.dim() - 1)))


class LinearPath:
    """x_t = t * x1 + (1 - t) * x0: the velocity is x1 - x0 (SiT's ICPlan, "Linear")."""

    def alpha(self, t):
        """(alpha_t, d alpha_t / dt), the data coefficient."""
        return t, 1

    def sigma(self, t):
        """(sigma_t, d sigma_t / dt), the noise coefficient."""
        return 1 - t, -1

    def d_alpha_over_alpha(self, t):
        return 1 / t

    def drift(self, x: torch.Tensor, t: torch.Tensor):
        """(drift, diffusion) of the forward SDE in score form: the pieces every drift is made of."""
        t = expand_t_like_x(t, x)
        ratio = self.d_alpha_over_alpha(t)
        sigma_t, d_sigma_t = self.sigma(t)
        return -(ratio * x), ratio * (sigma_t ** 2) - sigma_t * d_sigma_t

    def diffusion(self, x: torch.Tensor, t: torch.Tensor, form: str, norm: float):
        """The SDE sampler's diffusion coefficient w_t in one of SiT's six forms."""
        t = expand_t_like_x(t, x)
        if form == "constant":  # a tensor (SiT returns the float, which its sqrt cannot take)
            return norm * torch.ones_like(t)
        if form == "SBDM":
            return norm * self.drift(x, t)[1]
        if form == "sigma":
            return norm * self.sigma(t)[0]
        if form == "linear":
            return norm * (1 - t)
        if form == "decreasing":
            return 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2
        if form == "increasing-decreasing":
            return norm * torch.sin(math.pi * t) ** 2
        raise ValueError(f"diffusion form must be one of {', '.join(DIFFUSION_FORMS)}, got {form!r}")

    def score_from_velocity(self, velocity: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = expand_t_like_x(t, x)
        alpha_t, d_alpha_t = self.alpha(t)
        sigma_t, d_sigma_t = self.sigma(t)
        reverse_alpha_ratio = alpha_t / d_alpha_t
        variance = sigma_t ** 2 - reverse_alpha_ratio * d_sigma_t * sigma_t
        return (reverse_alpha_ratio * velocity - x) / variance

    def plan(self, t: torch.Tensor, x0: torch.Tensor, x1: torch.Tensor):
        """(x_t, u_t): the point on the path and its velocity, the training target."""
        t = expand_t_like_x(t, x1)
        alpha_t, d_alpha_t = self.alpha(t)
        sigma_t, d_sigma_t = self.sigma(t)
        return alpha_t * x1 + sigma_t * x0, d_alpha_t * x1 + d_sigma_t * x0


class GVPPath(LinearPath):
    """Generalised variance preserving: alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2)."""

    def alpha(self, t):
        return torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2)

    def sigma(self, t):
        return torch.cos(t * math.pi / 2), -math.pi / 2 * torch.sin(t * math.pi / 2)

    def d_alpha_over_alpha(self, t):
        return math.pi / (2 * torch.tan(t * math.pi / 2))


class VPPath(LinearPath):
    """The variance-preserving path of score SDEs, beta from sigma_min = 0.1 to sigma_max = 20
    (SiT's VPCPlan names)."""

    def __init__(self, sigma_min: float = 0.1, sigma_max: float = 20.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def log_mean_coeff(self, t):
        return -0.25 * ((1 - t) ** 2) * (self.sigma_max - self.sigma_min) - 0.5 * (1 - t) * self.sigma_min

    def d_alpha_over_alpha(self, t):
        return 0.5 * (1 - t) * (self.sigma_max - self.sigma_min) + 0.5 * self.sigma_min

    def alpha(self, t):
        alpha_t = torch.exp(self.log_mean_coeff(t))
        return alpha_t, alpha_t * self.d_alpha_over_alpha(t)

    def sigma(self, t):
        twice = 2 * self.log_mean_coeff(t)
        sigma_t = torch.sqrt(1 - torch.exp(twice))
        return sigma_t, torch.exp(twice) * (2 * self.d_alpha_over_alpha(t)) / (-2 * sigma_t)

    def drift(self, x: torch.Tensor, t: torch.Tensor):
        t = expand_t_like_x(t, x)
        beta_t = self.sigma_min + (1 - t) * (self.sigma_max - self.sigma_min)
        return -0.5 * beta_t * x, beta_t / 2


PATHS = {"Linear": LinearPath, "GVP": GVPPath, "VP": VPPath}
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
