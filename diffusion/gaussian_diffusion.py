"""Gaussian diffusion (DDPM with IDDPM's learned variances): schedules, losses, samplers.

All schedule arithmetic is float64 numpy; each per-timestep value is gathered and then cast to
float32, which is what makes results match the official implementation to the last bits.
"""
import enum
import math
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from .diffusion_utils import discretized_gaussian_log_likelihood, normal_kl


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


class ModelMeanType(enum.Enum):
    """What the network's first C output channels predict."""
    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise


class ModelVarType(enum.Enum):
    """Where the reverse-step variance comes from."""
    LEARNED = enum.auto()  # the network outputs log-variance directly
    FIXED_SMALL = enum.auto()  # posterior variance beta-tilde
    FIXED_LARGE = enum.auto()  # beta (with beta-tilde at t=0)
    LEARNED_RANGE = enum.auto()  # the network interpolates between the two in log space (DiT)


class LossType(enum.Enum):
    MSE = enum.auto()  # MSE on the mean, plus the VB term when the variance is learned
    RESCALED_MSE = enum.auto()  # same, with the VB term scaled by num_timesteps / 1000
    KL = enum.auto()  # the variational bound alone
    RESCALED_KL = enum.auto()  # the variational bound times num_timesteps

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """The two schedules DiT users pick from; both stay well-defined as the step count changes."""
    if schedule_name == "linear":
        # Ho et al.'s 1e-4..0.02 for 1000 steps, scaled so any step count spans the same noise.
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"unknown noise schedule {schedule_name!r}: expected 'linear' or 'squaredcos_cap_v2'")


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
    """Betas such that the cumulative product of (1 - beta) follows alpha_bar(t) on t in [0, 1]."""
    n = num_diffusion_timesteps
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], dtype=np.float64)


def full_precision(output: torch.Tensor) -> torch.Tensor:
    """A model output computed under autocast (bf16/fp16) cast up to float32, so the diffusion's
    own arithmetic (variance interpolation, KL, likelihood, MSE) never runs in half precision."""
    return output.float() if output.dtype in (torch.float16, torch.bfloat16) else output


def _infer_device(model, noise: Optional[torch.Tensor]) -> torch.device:
    """Where to sample when no device is given: the noise's, else the model's parameters'."""
    if noise is not None:
        return noise.device
    owner = getattr(model, "__self__", model)  # a bound method such as model.forward_with_cfg
    if hasattr(owner, "parameters"):
        return next(owner.parameters()).device
    raise ValueError("cannot tell which device to sample on: pass device=... (or noise=...)")


class GaussianDiffusion:
    """The forward process q, the learned reverse process p, their losses and samplers."""

    def __init__(self, *, betas: np.ndarray, model_mean_type: ModelMeanType, model_var_type: ModelVarType,
                 loss_type: LossType):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t=0: reuse the t=1 value there so the log stays finite.
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if len(self.posterior_variance) > 1 else np.array([])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

        # Values the methods below gather, derived once here rather than on every call.
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.log_betas = np.log(betas)
        # FIXED_LARGE variance: beta_t, but beta-tilde_1 at t=0 for a better decoder log-likelihood.
        self.fixed_large_variance = np.append(self.posterior_variance[1], betas[1:]) if len(betas) > 1 else betas
        self.fixed_large_log_variance = np.log(self.fixed_large_variance)
        self.recip_posterior_mean_coef1 = 1.0 / self.posterior_mean_coef1
        self.posterior_mean_coef_ratio = self.posterior_mean_coef2 / self.posterior_mean_coef1
        self._device_tables: dict = {}

    def _extract(self, name: str, timesteps: torch.Tensor, broadcast_shape) -> torch.Tensor:
        """The float64 table self.<name> gathered at timesteps, cast to float32 and broadcast to
        (N, *broadcast_shape[1:]). Each table is copied to a device once, so a sampling step makes
        no host-to-device copies (the official code converted the numpy array on every call)."""
        key = (name, timesteps.device)
        table = self._device_tables.get(key)
        if table is None:
            table = self._device_tables[key] = torch.from_numpy(getattr(self, name)).to(timesteps.device)
        res = table[timesteps].float()
        return res.reshape(res.shape + (1,) * (len(broadcast_shape) - res.ndim)).expand(broadcast_shape)

    # ---- the forward process -------------------------------------------------------------------

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, x_start.shape)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0): diffuse the data t steps."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x_start shape {tuple(x_start.shape)}")
        return (self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        posterior_mean = (self._extract("posterior_mean_coef1", t, x_t.shape) * x_start
                          + self._extract("posterior_mean_coef2", t, x_t.shape) * x_t)
        posterior_variance = self._extract("posterior_variance", t, x_t.shape)
        posterior_log_variance_clipped = self._extract("posterior_log_variance_clipped", t, x_t.shape)
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    # ---- the reverse process -------------------------------------------------------------------

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None) -> dict:
        """Run the model once and turn its output into p(x_{t-1} | x_t): mean, variance, x_0 guess."""
        if model_kwargs is None:
            model_kwargs = {}
        channels = x.shape[1]
        model_output = model(x, t, **model_kwargs)
        extra = None
        if isinstance(model_output, tuple):
            model_output, extra = model_output
        model_output = full_precision(model_output)

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if model_output.shape[1] != 2 * channels:
                raise ValueError(f"a learned-variance model must output {2 * channels} channels "
                                 f"(mean and variance for {channels}), got {model_output.shape[1]}")
            model_output, model_var_values = torch.split(model_output, channels, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = model_var_values
            else:
                min_log = self._extract("posterior_log_variance_clipped", t, x.shape)
                max_log = self._extract("log_betas", t, x.shape)
                frac = (model_var_values + 1) / 2  # the model outputs v in [-1, 1]
                model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            if self.model_var_type == ModelVarType.FIXED_LARGE:
                variance, log_variance = "fixed_large_variance", "fixed_large_log_variance"
            else:
                variance, log_variance = "posterior_variance", "posterior_log_variance_clipped"
            model_variance = self._extract(variance, t, x.shape)
            model_log_variance = self._extract(log_variance, t, x.shape)

        def process_xstart(x_start):
            if denoised_fn is not None:
                x_start = denoised_fn(x_start)
            return x_start.clamp(-1, 1) if clip_denoised else x_start

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = process_xstart(model_output)
        elif self.model_mean_type == ModelMeanType.EPSILON:
            pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
        else:
            pred_xstart = process_xstart(self._predict_xstart_from_xprev(x_t=x, t=t, xprev=model_output))
        model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return {"mean": model_mean, "variance": model_variance, "log_variance": model_log_variance,
                "pred_xstart": pred_xstart, "extra": extra}

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps)

    def _predict_xstart_from_xprev(self, x_t, t, xprev):
        # invert the posterior mean: x_prev = coef1 * x_0 + coef2 * x_t
        return (self._extract("recip_posterior_mean_coef1", t, x_t.shape) * xprev
                - self._extract("posterior_mean_coef_ratio", t, x_t.shape) * x_t)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape))

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Shift the mean by variance * grad log p(y|x) (Sohl-Dickstein et al.; ADM's classifier guidance)."""
        gradient = cond_fn(x, t, **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Guide through the score instead (Song et al.), as DDIM needs: eps -= sqrt(1-abar) * grad."""
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, t, **(model_kwargs or {}))
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None) -> dict:
        """One ancestral step x_t -> x_{t-1}. The model runs first, then one randn_like(x) is drawn."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        noise = torch.randn_like(x)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))  # no noise at t == 0
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                      model_kwargs=None, device=None, progress=False) -> torch.Tensor:
        """Ancestral sampling from pure noise through every step; returns the final x_0."""
        final = None
        for final in self.p_sample_loop_progressive(model, shape, noise=noise, clip_denoised=clip_denoised,
                                                    denoised_fn=denoised_fn, cond_fn=cond_fn, model_kwargs=model_kwargs,
                                                    device=device, progress=progress):
            pass
        return final["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                                  model_kwargs=None, device=None, progress=False) -> Iterator[dict]:
        """Like p_sample_loop, yielding each step's {"sample", "pred_xstart"}."""
        for out in self._sample_steps(self.p_sample, model, shape, noise, device, progress,
                                      clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                      cond_fn=cond_fn, model_kwargs=model_kwargs):
            yield out

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
                    eta=0.0) -> dict:
        """One DDIM step x_t -> x_{t-1} (Song et al., eq. 12); eta=0 is deterministic."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        # Recompute eps from the (maybe clipped) x_0 so the two stay consistent.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x.shape)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        noise = torch.randn_like(x)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        sample = mean_pred + nonzero_mask * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
                            eta=0.0) -> dict:
        """One deterministic DDIM step backwards, x_t -> x_{t+1} (encoding an image into noise)."""
        if eta != 0.0:
            raise ValueError(f"ddim_reverse_sample is deterministic: eta must be 0.0, got {eta}")
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._extract("alphas_cumprod_next", t, x.shape)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_next) + torch.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                         model_kwargs=None, device=None, progress=False, eta=0.0) -> torch.Tensor:
        """DDIM sampling from pure noise through every (respaced) step; returns the final x_0."""
        final = None
        for final in self.ddim_sample_loop_progressive(model, shape, noise=noise, clip_denoised=clip_denoised,
                                                       denoised_fn=denoised_fn, cond_fn=cond_fn,
                                                       model_kwargs=model_kwargs, device=device, progress=progress,
                                                       eta=eta):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                                     model_kwargs=None, device=None, progress=False, eta=0.0) -> Iterator[dict]:
        """Like ddim_sample_loop, yielding each step's {"sample", "pred_xstart"}."""
        for out in self._sample_steps(self.ddim_sample, model, shape, noise, device, progress,
                                      clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                      cond_fn=cond_fn, model_kwargs=model_kwargs, eta=eta):
            yield out

    def _sample_steps(self, step, model, shape, noise, device, progress, **step_kwargs) -> Iterator[dict]:
        """Shared loop of both samplers: draw x_T (unless given), then step from T-1 down to 0."""
        if not isinstance(shape, (tuple, list)):
            raise ValueError(f"shape must be a tuple or list such as (N, C, H, W), got {shape!r}")
        if device is None:
            device = _infer_device(model, noise)
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"noise shape {tuple(noise.shape)} differs from the requested shape {tuple(shape)}")
            img = noise
        else:
            img = torch.randn(*shape, device=device)
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm
            indices = tqdm(indices)
        steps = torch.arange(self.num_timesteps, device=device)  # made once: no host-to-device copy per step
        for i in indices:
            t = steps[i].repeat(shape[0])
            with torch.no_grad():
                out = step(model, img, t, **step_kwargs)
                yield out
                img = out["sample"]

    # ---- likelihood and training ---------------------------------------------------------------

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None) -> dict:
        """One term of the variational bound, in bits per dimension: the decoder NLL at t=0, else a KL."""
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"],
                                                           log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None) -> dict:
        """Per-sample losses at timesteps t: {"loss", and "mse"/"vb" where they apply}, each (N,)."""
        if model_kwargs is None:
            model_kwargs = {}
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)

        terms = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model=model, x_start=x_start, x_t=x_t, t=t, clip_denoised=False,
                                               model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output = full_precision(model(x_t, t, **model_kwargs))
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            batch, channels = x_t.shape[:2]
            expected = (batch, channels * 2, *x_t.shape[2:])
            if tuple(model_output.shape) != expected:
                raise ValueError(f"a learned-variance model must output {expected}, got {tuple(model_output.shape)}")
            model_output, model_var_values = torch.split(model_output, channels, dim=1)
            # The VB term trains the variance only: the mean it sees is detached.
            frozen_out = torch.cat([model_output.detach(), model_var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(model=lambda *args, r=frozen_out: r, x_start=x_start, x_t=x_t, t=t,
                                             clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                # Without this, the VB term would grow with the number of steps (the paper used 1000).
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = noise
        if model_output.shape != target.shape:
            raise ValueError(f"model output {tuple(model_output.shape)} does not match the target "
                             f"{tuple(target.shape)}")
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension: the part of the bound no model can change."""
        t = torch.tensor([self.num_timesteps - 1] * x_start.shape[0], device=x_start.device)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(qt_mean, qt_log_variance, 0.0, 0.0)) / np.log(2.0)

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None) -> dict:
        """The whole variational bound (bits/dim), term by term, with eps and x_0 errors per step."""
        batch = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for step in list(range(self.num_timesteps))[::-1]:
            t = torch.tensor([step] * batch, device=x_start.device)
            noise = torch.randn_like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t, noise=noise)
            with torch.no_grad():
                out = self._vb_terms_bpd(model, x_start=x_start, x_t=x_t, t=t, clip_denoised=clip_denoised,
                                         model_kwargs=model_kwargs)
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))
        vb = torch.stack(vb, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        return {"total_bpd": vb.sum(dim=1) + prior_bpd, "prior_bpd": prior_bpd, "vb": vb,
                "xstart_mse": torch.stack(xstart_mse, dim=1), "mse": torch.stack(mse, dim=1)}
