"""The pieces of a training step: what a step changes (TrainState), the objective (DiT's diffusion or
a SiT's transport), the learning rate, the EMA, the batch order that resumes mid-epoch, and the
latents the network trains on."""
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import DistributedSampler

from diffusion import create_diffusion
from ditlib.datasets import TrainingData
from ditlib.errors import SettingError
from ditlib.latents import encode_posterior, sample_latents
from ditlib.processes import forked_rng, rank_zero_decides
from ditlib.samplers import FlowSampler, Sampler
from ditlib.weights import load_init_weights
from transport import Transport


@dataclass
class TrainState:
    """What a training step changes and a checkpoint keeps."""
    model: torch.nn.Module
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_steps: int = 0
    epoch: int = 0
    batches_into_epoch: int = 0  # optimizer steps taken in the current epoch
    schedule_steps: int = 0  # the length of the learning-rate schedule, fixed when the run starts


class Objective:
    """What the network learns: DiT's diffusion (1,000 steps, linear schedule, learned variance) or,
    given a transport, a SiT's flow. Its random numbers are drawn in the order each one's own
    training code draws them."""

    def __init__(self, transport: Optional[Transport] = None):
        self.transport = transport
        self.diffusion = create_diffusion(timestep_respacing="") if transport is None else None
        self.time_unit = 1000 if transport is None else 1  # DiT's t runs 0..999, a SiT's in [0, 1]

    def draw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, noise) for a batch: DiT's randint then randn_like; SiT's randn_like, then its times
        from torch.rand on the CPU generator."""
        if self.transport is None:
            t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=x.device)
            return t, torch.randn_like(x)
        noise = torch.randn_like(x)
        return self.transport.training_times(x.shape[0]).to(x), noise

    def losses(self, model, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict, noise: torch.Tensor) -> dict:
        if self.transport is None:
            return self.diffusion.training_losses(model, x, t, model_kwargs, noise=noise)
        return self.transport.training_losses(model, x, model_kwargs, noise=noise, t=t)

    def sampler(self, name: Optional[str], steps: int):
        """A sampler for grids and FID: a DiT's by name (ddpm by default); a SiT's ode (the default:
        SiT's train.py draws its grids with it) or sde."""
        if self.transport is None:
            return Sampler(name or "ddpm", steps)
        return FlowSampler(self.transport, name or "ode", steps)


@dataclass(frozen=True)
class LearningRate:
    """Linear warm-up over warmup_steps, then constant (the official schedule), or a cosine or
    linear decay to lr_min at the schedule's last step."""
    lr: float = 1e-4
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    lr_min: float = 0.0

    def at(self, train_steps: int, total_steps: int) -> float:
        """The rate of a step: a function of the step alone, so a resumed run continues the schedule."""
        if self.warmup_steps and train_steps < self.warmup_steps:
            return self.lr * (train_steps + 1) / self.warmup_steps
        if self.lr_schedule == "constant":
            return self.lr
        progress = min(1.0, (train_steps - self.warmup_steps) / max(total_steps - self.warmup_steps, 1))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.lr_schedule == "cosine" else 1 - progress
        return self.lr_min + (self.lr - self.lr_min) * shape

    def schedule_length(self, saved_steps: int, max_steps: int) -> tuple[int, list]:
        """(the schedule's length, lines for the log). A decaying rate keeps the length it had when
        the run started, so a resumed run with another max_steps continues the same curve (after its
        end the rate stays at lr_min)."""
        if not saved_steps:
            return max_steps, []
        if saved_steps != max_steps and self.lr_schedule != "constant":
            return saved_steps, [f"The {self.lr_schedule} schedule keeps the length of {saved_steps} steps it was "
                                 f"started with (--max-steps is now {max_steps}); after it the rate stays at "
                                 f"--lr-min {self.lr_min}"]
        return saved_steps, []


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float = 0.9999) -> None:
    """ema = decay * ema + (1 - decay) * model for every trained parameter, in two fused foreach ops.

    The fixed position table is left alone: averaging a constant with itself only adds rounding.
    """
    pairs = [(e, p.detach()) for e, p in zip(ema_model.parameters(), model.parameters()) if p.requires_grad]
    ema_params, model_params = [e for e, _ in pairs], [p for _, p in pairs]
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, model_params, alpha=1 - decay)


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way, so a resumed run sees the same batches."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip_samples = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip_samples:])

    def __len__(self):
        return self.num_samples - self.skip_samples


def per_process_batch(global_batch_size: int, grad_accum_steps: int, world_size: int) -> int:
    """The batch of one process, which the micro-batches of gradient accumulation divide."""
    if global_batch_size % world_size:
        raise SettingError("global_batch_size", f"{global_batch_size} is not divisible by the world size "
                                                f"{world_size}")
    local_batch = global_batch_size // world_size
    if local_batch % grad_accum_steps:
        raise SettingError("grad_accum_steps", f"{grad_accum_steps} does not divide the per-process batch "
                                               f"{local_batch} (--global-batch-size {global_batch_size} over "
                                               f"{world_size} processes)")
    return local_batch


def to_latents(x: torch.Tensor, data: TrainingData, random_flip: bool) -> torch.Tensor:
    """What the DiT trains on: a batch flipped per sample (drawn from the main process's generator,
    so the choice is saved and resumed; nothing is drawn without random_flip), then a draw from the
    VAE posterior, scaled (the stored one with latents from extract_features.py)."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5 if random_flip else None
    if data.stored_latents:  # x holds (unflipped, flipped) x (mean, std)
        chosen = x[:, 0] if flip is None else torch.where(flip[:, None, None, None, None], x[:, 1], x[:, 0])
        return sample_latents(chosen[:, 0], chosen[:, 1], data.scale)
    if flip is not None:
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return sample_latents(*encode_posterior(data.vae, x), data.scale) if data.vae is not None else x


def class_dropout(batch: int, probability: float, device: torch.device) -> Optional[torch.Tensor]:
    """Which labels of a batch become the null class, drawn as the label embedder draws them (one
    torch.rand(N)); None without label dropout, where the embedder draws nothing."""
    return (torch.rand(batch, device=device) < probability).long() if probability > 0 else None


def initialise(model: torch.nn.Module, init_from: Optional[str], resumed_from, rank: int,
               device: torch.device) -> list:
    """Weights for a new run from init_from (rank 0 downloads first); lines for the log. A resumed
    run keeps its own. Reading the source draws nothing from the training stream."""
    if init_from is None:
        return []
    if resumed_from is not None:
        return [f"--resume wins over --init-from: continuing {resumed_from} (started from {init_from})"]
    with forked_rng(device):
        notes = rank_zero_decides(rank, lambda: load_init_weights(model, init_from))
        if rank != 0:
            load_init_weights(model, init_from)
    return notes
