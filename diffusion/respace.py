"""Sampling (or training) on a subset of the original timesteps, e.g. 250 of 1000."""
from typing import Iterable, Union

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps: int, section_counts: Union[str, Iterable[int]]) -> set:
    """Which of the original steps to keep.

    section_counts is either a list of counts (or a comma-separated string of them): the steps are
    cut into that many equal sections and each section keeps that many evenly strided steps, its
    first and last included; e.g. (10, 15, 20) on 300 steps keeps 10 of steps 0-99, 15 of 100-199
    and 20 of 200-299. Or "ddimN": the integer stride that gives exactly N steps counting from 0,
    as in the DDIM paper (the official code tries strides up to num_timesteps - 1, so it refuses
    "ddim1"; here the stride num_timesteps is allowed too, keeping step 0 alone).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            return _ddim_steps(num_timesteps, section_counts)
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(f"timestep respacing {section_counts!r} is neither 'ddimN' nor a comma-separated "
                             f"list of step counts such as '250' or '10,20,30'") from None
    section_counts = list(section_counts)
    if not section_counts or any(count < 0 for count in section_counts) or sum(section_counts) < 1:
        raise ValueError(f"a respacing must keep at least one step and no section a negative count, "
                         f"got {section_counts}")  # a section of 0 keeps none of its steps, as officially
    if len(section_counts) > num_timesteps:
        raise ValueError(f"cannot cut {num_timesteps} steps into {len(section_counts)} sections")
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start_idx = 0
    kept = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot keep {section_count} steps from a section of {size} "
                             f"(respacing {section_counts} of {num_timesteps} steps)")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        # A float running sum, as the official code keeps it: round(j * frac_stride) would round
        # differently wherever the sum's error lands near .5 (278 of the 1000 one-section counts).
        cur_idx = 0.0
        for _ in range(section_count):
            kept.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(kept)


def _ddim_steps(num_timesteps: int, spec: str) -> set:
    try:
        desired_count = int(spec[len("ddim"):])
    except ValueError:
        raise ValueError(f"timestep respacing {spec!r} must be 'ddim' followed by a step count, "
                         f"e.g. 'ddim50'") from None
    if desired_count < 1 or desired_count > num_timesteps:
        raise ValueError(f"{spec!r} asks for {desired_count} steps; it must be between 1 and {num_timesteps}")
    for stride in range(1, num_timesteps + 1):
        if len(range(0, num_timesteps, stride)) == desired_count:
            return set(range(0, num_timesteps, stride))
    raise ValueError(f"no integer stride gives exactly {desired_count} of {num_timesteps} steps ({spec!r}); "
                     f"pick another count or use a plain count such as '{desired_count}'")


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion over the kept steps only; the model still sees the ORIGINAL timestep numbers."""

    def __init__(self, use_timesteps: Iterable[int], **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.original_num_steps = len(kwargs["betas"])
        base = GaussianDiffusion(**kwargs)
        if not self.use_timesteps or not self.use_timesteps <= set(range(self.original_num_steps)):
            raise ValueError(f"use_timesteps must be a non-empty subset of 0..{self.original_num_steps - 1}")
        # Betas between consecutive kept steps, so alphas_cumprod at the kept steps is unchanged.
        self.timestep_map = sorted(self.use_timesteps)
        kept_alphas_cumprod = base.alphas_cumprod[self.timestep_map]
        kwargs["betas"] = 1 - kept_alphas_cumprod / np.append(1.0, kept_alphas_cumprod[:-1])
        super().__init__(**kwargs)

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self.timestep_map)


class _WrappedModel:
    """Calls the model with original timestep numbers in place of spaced indices."""

    def __init__(self, model, timestep_map: list):
        self.model = model
        self.timestep_map = timestep_map
        self._map_tensors = {}

    def __call__(self, x, ts, **kwargs):
        key = (ts.device, ts.dtype)
        if key not in self._map_tensors:
            self._map_tensors[key] = torch.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
        return self.model(x, self._map_tensors[key][ts], **kwargs)
