"""Which timesteps to train on: uniformly, or by importance (IDDPM's loss-second-moment sampler)."""
from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.distributed as dist


def create_named_schedule_sampler(name: str, diffusion) -> "ScheduleSampler":
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise ValueError(f"unknown schedule sampler {name!r}: expected 'uniform' or 'loss-second-moment'")


class ScheduleSampler(ABC):
    """A distribution over timesteps, with the weights that keep the loss estimate unbiased."""

    @abstractmethod
    def weights(self) -> np.ndarray:
        """Unnormalised positive weight per timestep."""

    def sample(self, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw timesteps (numpy's global RNG) -> (indices, 1 / (T * p(index)))."""
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        indices = torch.from_numpy(indices_np).long().to(device)
        weights = torch.from_numpy(1 / (len(p) * p[indices_np])).float().to(device)
        return indices, weights


class UniformSampler(ScheduleSampler):
    def __init__(self, diffusion):
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self) -> np.ndarray:
        return self._weights


class LossAwareSampler(ScheduleSampler):
    """A sampler that learns from the losses seen; every rank must call the update collectively."""

    def update_with_local_losses(self, local_ts: torch.Tensor, local_losses: torch.Tensor) -> None:
        """Gather (t, loss) pairs from all ranks (batches may differ in size) and update."""
        if not (dist.is_available() and dist.is_initialized()):
            self.update_with_all_losses(local_ts.tolist(), local_losses.tolist())
            return
        world = dist.get_world_size()
        sizes = [torch.zeros(1, dtype=torch.int64, device=local_ts.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([len(local_ts)], dtype=torch.int64, device=local_ts.device))
        sizes = [int(s.item()) for s in sizes]
        largest = max(sizes)
        gathered_ts = [torch.zeros(largest, dtype=local_ts.dtype, device=local_ts.device) for _ in sizes]
        gathered_losses = [torch.zeros(largest, dtype=local_losses.dtype, device=local_losses.device) for _ in sizes]
        dist.all_gather(gathered_ts, torch.nn.functional.pad(local_ts, (0, largest - len(local_ts))))
        dist.all_gather(gathered_losses, torch.nn.functional.pad(local_losses, (0, largest - len(local_losses))))
        timesteps = [t for ts, n in zip(gathered_ts, sizes) for t in ts[:n].tolist()]
        losses = [x for ls, n in zip(gathered_losses, sizes) for x in ls[:n].tolist()]
        self.update_with_all_losses(timesteps, losses)

    @abstractmethod
    def update_with_all_losses(self, ts: list, losses: list) -> None:
        """Same list of (timestep, loss) pairs on every rank."""


class LossSecondMomentResampler(LossAwareSampler):
    """p(t) proportional to sqrt(E[loss_t^2]) over the last `history_per_term` losses, once all are seen."""

    def __init__(self, diffusion, history_per_term: int = 10, uniform_prob: float = 0.001):
        self.num_timesteps = diffusion.num_timesteps
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([self.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([self.num_timesteps], dtype=np.int64)

    def weights(self) -> np.ndarray:
        if not (self._loss_counts == self.history_per_term).all():
            return np.ones([self.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts: list, losses: list) -> None:
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                self._loss_history[t, :-1] = self._loss_history[t, 1:]  # drop the oldest
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1
