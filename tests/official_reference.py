"""The official DiT/IDDPM sampling algorithms, transcribed as plainly as possible for the tests.

Independent of diffusion/: one function per official routine, the schedule as float64 numpy, each
per-step coefficient gathered and cast to float32 the way the official `_extract_into_tensor`
does, and the official RNG order (initial randn, then one randn_like per step after the model).
tests/test_golden.py first checks this transcription against the official outputs in the golden
file, then uses it for the respacings and samplers the golden file does not hold (DDIM, "35",
"10,15,20", ...).
"""
import numpy as np
import torch


def space_timesteps(num_timesteps: int, section_counts) -> set:
    """The official rule, float running sum included."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim"):])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired_count:
                    return set(range(0, num_timesteps, i))
            raise ValueError(f"cannot create exactly {num_timesteps} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken_steps = []
        for _ in range(section_count):
            taken_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken_steps
        start_idx += size
    return set(all_steps)


class Schedule:
    """The spaced linear schedule of a DiT diffusion (1000 steps) and its derived tables."""

    def __init__(self, respacing: str):
        full_betas = np.linspace(0.0001, 0.02, 1000, dtype=np.float64)
        full_alphas_cumprod = np.cumprod(1.0 - full_betas, axis=0)
        use = space_timesteps(1000, respacing or [1000])
        last, betas, self.timestep_map = 1.0, [], []
        for i, alpha_cumprod in enumerate(full_alphas_cumprod):
            if i in use:
                betas.append(1 - alpha_cumprod / last)
                last = alpha_cumprod
                self.timestep_map.append(i)
        self.betas = np.array(betas, dtype=np.float64)
        self.num_timesteps = len(betas)
        self.alphas_cumprod = np.cumprod(1.0 - self.betas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(1.0 - self.betas)
                                     / (1.0 - self.alphas_cumprod))


def extract(arr: np.ndarray, timesteps: torch.Tensor, broadcast_shape) -> torch.Tensor:
    res = torch.from_numpy(arr).to(device=timesteps.device)[timesteps].float()
    while len(res.shape) < len(broadcast_shape):
        res = res[..., None]
    return res + torch.zeros(broadcast_shape, device=timesteps.device)


def p_mean_variance(s: Schedule, model, x, t, clip_denoised, model_kwargs):
    """Learned-range variance, epsilon prediction: DiT's configuration."""
    channels = x.shape[1]
    model_output = model(x, torch.tensor(s.timestep_map, device=t.device, dtype=t.dtype)[t], **model_kwargs)
    model_output, model_var_values = torch.split(model_output, channels, dim=1)
    min_log = extract(s.posterior_log_variance_clipped, t, x.shape)
    max_log = extract(np.log(s.betas), t, x.shape)
    frac = (model_var_values + 1) / 2
    model_log_variance = frac * max_log + (1 - frac) * min_log
    pred_xstart = (extract(s.sqrt_recip_alphas_cumprod, t, x.shape) * x
                   - extract(s.sqrt_recipm1_alphas_cumprod, t, x.shape) * model_output)
    if clip_denoised:
        pred_xstart = pred_xstart.clamp(-1, 1)
    mean = extract(s.posterior_mean_coef1, t, x.shape) * pred_xstart + extract(s.posterior_mean_coef2, t, x.shape) * x
    return mean, model_log_variance, pred_xstart


def p_sample_loop(respacing: str, model, shape, noise=None, clip_denoised=True, model_kwargs=None) -> torch.Tensor:
    s = Schedule(respacing)
    img = noise if noise is not None else torch.randn(*shape)
    for i in list(range(s.num_timesteps))[::-1]:
        t = torch.tensor([i] * shape[0])
        with torch.no_grad():
            mean, log_variance, _ = p_mean_variance(s, model, img, t, clip_denoised, model_kwargs or {})
            noise_i = torch.randn_like(img)
            nonzero_mask = (t != 0).float().view(-1, *([1] * (len(img.shape) - 1)))
            img = mean + nonzero_mask * torch.exp(0.5 * log_variance) * noise_i
    return img


def ddim_sample_loop(respacing: str, model, shape, noise=None, clip_denoised=True, model_kwargs=None,
                     eta: float = 0.0) -> torch.Tensor:
    s = Schedule(respacing)
    img = noise if noise is not None else torch.randn(*shape)
    for i in list(range(s.num_timesteps))[::-1]:
        t = torch.tensor([i] * shape[0])
        with torch.no_grad():
            _, _, pred_xstart = p_mean_variance(s, model, img, t, clip_denoised, model_kwargs or {})
            eps = ((extract(s.sqrt_recip_alphas_cumprod, t, img.shape) * img - pred_xstart)
                   / extract(s.sqrt_recipm1_alphas_cumprod, t, img.shape))
            alpha_bar = extract(s.alphas_cumprod, t, img.shape)
            alpha_bar_prev = extract(s.alphas_cumprod_prev, t, img.shape)
            sigma = (eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
                     * torch.sqrt(1 - alpha_bar / alpha_bar_prev))
            noise_i = torch.randn_like(img)
            mean_pred = pred_xstart * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
            nonzero_mask = (t != 0).float().view(-1, *([1] * (len(img.shape) - 1)))
            img = mean_pred + nonzero_mask * sigma * noise_i
    return img
