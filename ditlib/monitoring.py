"""What a run reports and watches between steps: the official log line with metrics.jsonl and the
tracker, EMA sample grids, FID of EMA samples, a non-finite loss, and requests to stop."""
import json
import math
import resource
import signal
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from ditlib.datasets import TrainingData
from ditlib.files import atomic_write, format_bytes, remove_stale_temporaries, require_writable
from ditlib.images import save_image_grid, to_uint8_images
from ditlib.latents import decode
from ditlib.metrics import InceptionNetwork, as_uint8_nchw, extract, frechet_distance, statistics
from ditlib.processes import close_logger, create_logger, forked_rng, rank_zero_decides, rank_zero_first
from ditlib.runs import claim_experiment
from ditlib.samplers import Sampler, generate
from ditlib.trackers import open_tracker
from ditlib.training import Objective, TrainState

HEALTH_CHECK_EVERY = 10  # steps between checks for a non-finite loss or a stop signal (besides log steps)
NEVER = 2 ** 52  # "no non-finite loss yet" (exact in float64, which the check's all-reduce uses)


@dataclass(frozen=True)
class Monitoring:
    """How often and how a run logs, draws sample grids and measures FID (train.py's flags)."""
    log_every: int = 100
    global_seed: int = 0
    num_classes: int = 1000
    global_batch_size: int = 256
    sample_every: int = 0
    sample_steps: int = 50
    sample_cfg_scale: float = 4.0
    sample_grid_size: int = 16
    fid_every: int = 0
    fid_ref: Optional[str] = None
    fid_samples: int = 5000
    fid_sampler: Optional[str] = "ddim"
    fid_steps: int = 50
    fid_cfg_scale: float = 1.0
    inception: Optional[str] = None


@dataclass
class Outputs:
    """Where the run writes (rank 0; other ranks hold None for the files)."""
    experiment_dir: Path
    checkpoint_dir: Path
    logger: object
    metrics_file: object = None
    tracker: object = None
    notes: list = field(default_factory=list)


class RunningMetrics:
    """What a log line reports, summed on the device between log lines (no host sync): the loss,
    the gradient norm, and each loss term by timestep quartile (IDDPM's loss_q0..loss_q3)."""

    TERMS = ("loss", "mse", "vb")

    def __init__(self, num_timesteps: int, device: torch.device):
        self.num_timesteps = num_timesteps
        self.steps = 0
        self.step_sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, finite grad norms, their count
        self.quartile_sums = torch.zeros(len(self.TERMS) + 1, 4, dtype=torch.float64, device=device)  # last: counts

    def add_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        finite = torch.isfinite(grad_norm)  # fp16's scaler skips the steps whose norm overflowed
        self.step_sums += torch.stack([loss.detach().double(), torch.where(finite, grad_norm.double(), 0.0),
                                       finite.double()])
        self.steps += 1

    def add_terms(self, t: torch.Tensor, terms: dict) -> None:
        quartile = (t * 4 // self.num_timesteps).long().clamp_(0, 3)  # a SiT's t = 1 joins the last
        for row, name in enumerate(self.TERMS):
            if name in terms:
                self.quartile_sums[row].index_add_(0, quartile, terms[name].detach().double())
        self.quartile_sums[-1].index_add_(0, quartile, torch.ones_like(quartile, dtype=torch.float64))

    def reduce(self) -> dict:
        """Collective: the loss averaged over steps and ranks (as the official log line), the mean
        gradient norm, and each term's mean over all samples of a quartile, on every rank."""
        sums = torch.cat([self.step_sums, self.quartile_sums.flatten()])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        sums = sums.tolist()
        (loss, norms, finite), quartiles = sums[:3], torch.tensor(sums[3:]).view(len(self.TERMS) + 1, 4)
        record = {"loss": loss / self.steps / dist.get_world_size(),
                  "grad_norm": norms / finite if finite else float("nan")}
        for row, name in enumerate(self.TERMS):
            for q in range(4):
                if quartiles[-1, q] > 0 and (name != "vb" or quartiles[row].any()):
                    record[f"{name}_q{q}"] = (quartiles[row, q] / quartiles[-1, q]).item()
        return record


class Monitor:
    """Everything a run reports between steps: the official log line (with metrics.jsonl and the
    tracker), EMA sample grids and FID. Sampling draws from private generators only."""

    def __init__(self, settings: Monitoring, out: Outputs, data: TrainingData, objective: Objective,
                 device: torch.device, fid: Optional["FidMonitor"]):
        self.settings, self.out, self.data, self.device, self.fid = settings, out, data, device, fid
        self.num_timesteps = objective.time_unit
        self.running, self.start_time = RunningMetrics(self.num_timesteps, device), time.time()
        generator = torch.Generator().manual_seed(settings.global_seed)  # the same noise and labels for every grid
        count = settings.sample_grid_size
        self.grid_noise = torch.randn(count, data.channels, data.latent_size, data.latent_size,
                                      generator=generator).to(device)
        self.grid_labels = (torch.arange(count) % settings.num_classes).to(device)
        self.grid_sampler = objective.sampler(None, settings.sample_steps)

    def log(self, state: TrainState, max_steps: int) -> None:
        """The official log line, at every log_every-th step."""
        if state.train_steps % self.settings.log_every == 0:
            self.log_line(state, max_steps)

    def evaluate(self, state: TrainState, rank: int, world_size: int, local_batch: int, stop: dict) -> bool:
        """Sample grids and FID, due at this step; True when a stop request (on any rank) cut the FID
        short. train.py calls it after the step's checkpoint is written, so an evaluation that fails
        or is stopped loses no training."""
        settings, step = self.settings, state.train_steps
        evaluated = time.time()
        if settings.sample_every and step % settings.sample_every == 0 and rank == 0:
            grid = self.out.experiment_dir / "samples" / f"{step:07d}.png"
            self.write_sample_grid(state.ema, grid)
            if self.out.tracker is not None:
                self.out.tracker.log_image("samples", grid, step)
        interrupted = False
        if settings.fid_every and step % settings.fid_every == 0:
            record = self.fid.measure(state.ema, self.data, rank, world_size, local_batch, self.device, stop)
            interrupted = record is STOPPED
            if interrupted:
                self.out.logger.info(f"(step={step:07d}) FID-{settings.fid_samples} not measured: stopped by "
                                     f"{stop['name'] or 'another rank'} after {time.time() - evaluated:.1f} s")
            elif rank == 0:
                record = {"step": step, **record, "fid_seconds": time.time() - evaluated}
                self.out.logger.info(f"(step={step:07d}) FID-{settings.fid_samples}: {record['fid']:.4f} (EMA "
                                     f"weights, {settings.fid_sampler} {settings.fid_steps} steps, cfg-scale "
                                     f"{settings.fid_cfg_scale}, {record['fid_seconds']:.1f} s)")
                write_record(self.out.metrics_file, record, self.out.tracker)
        self.start_time += time.time() - evaluated  # throughput counts training only
        return interrupted

    def log_line(self, state: TrainState, max_steps: int) -> None:
        """The official log line (loss averaged over ranks and steps, steps/s), with throughput, peak
        memory and the training time left at this speed; metrics.jsonl and the tracker also get the
        learning rate, gradient norm and the loss terms by timestep quartile."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        steps_per_sec = self.running.steps / (time.time() - self.start_time)
        reduced = self.running.reduce()
        record = {"step": state.train_steps, "loss": reduced.pop("loss"), "steps_per_sec": steps_per_sec,
                  "images_per_sec": steps_per_sec * self.settings.global_batch_size,
                  "peak_memory_mb": peak_memory_mb(self.device), "lr": state.opt.param_groups[0]["lr"], **reduced}
        left = timedelta(seconds=round(max(max_steps - state.train_steps, 0) / steps_per_sec))
        self.out.logger.info(f"(step={state.train_steps:07d}) Train Loss: {record['loss']:.4f}, Train Steps/Sec: "
                             f"{steps_per_sec:.2f}, Images/Sec: {record['images_per_sec']:.1f}, Peak Memory: "
                             f"{record['peak_memory_mb']:.0f} MB, Time Left: {left}")
        write_record(self.out.metrics_file, record, self.out.tracker)
        self.running, self.start_time = RunningMetrics(self.num_timesteps, self.device), time.time()

    @torch.no_grad()
    def write_sample_grid(self, ema: torch.nn.Module, path: Path) -> None:
        """Sample the EMA model with CFG and save a PNG grid; the training RNG is left untouched."""
        with forked_rng(self.device):
            torch.manual_seed(self.settings.global_seed)
            latents = generate(ema, self.grid_sampler, self.grid_noise, self.grid_labels,
                               self.settings.sample_cfg_scale, pixels=self.data.vae is None)
        save_image_grid(decode(self.data.vae, latents), path, nrow=int(math.ceil(math.sqrt(len(self.grid_noise)))))


class FidMonitor:
    """--fid-every: the FID network (rank 0 downloads it first, if it must), the reference
    statistics, and FID of EMA samples drawn in shares across the ranks."""

    def __init__(self, settings: Monitoring, objective: Objective, rank: int, device: torch.device):
        self.settings = settings
        self.sampler = objective.sampler(settings.fid_sampler, settings.fid_steps)
        self.network = rank_zero_first(rank, lambda: InceptionNetwork(settings.inception, device))
        # Statistics (evaluate.py --save-stats, ADM's batches) or images, whose statistics are computed here.
        self.reference = extract(self.network, settings.fid_ref, progress=False)
        dims = self.reference["mu"].shape[0]
        if dims != 2048:  # checked now, not at the first FID after hours of training
            raise ValueError(f"--fid-ref {settings.fid_ref}: its statistics have {dims} dimensions, the FID "
                             f"network's pool3 features 2048 (statistics of another network?)")

    def measure(self, ema, data: TrainingData, rank: int, world_size: int, batch_size: int,
                device: torch.device, stop: dict) -> Optional[dict]:
        """Collective: on rank 0 the FID record, None elsewhere; STOPPED on every rank when a stop
        request came before the last batch (a scheduler's grace period is shorter than an FID)."""
        settings = self.settings
        local = rank_fid_features(ema, data.vae, self.network, self.sampler, settings, rank, world_size,
                                  data.channels, data.latent_size, batch_size, device, stop)
        if local is None:
            return STOPPED
        gathered = [None] * world_size
        dist.all_gather_object(gathered, local)
        if rank != 0:
            return None
        return {"fid": frechet_distance(statistics(np.concatenate(gathered)), self.reference),
                "fid_samples": settings.fid_samples, "fid_sampler": settings.fid_sampler,
                "fid_steps": settings.fid_steps, "fid_cfg_scale": settings.fid_cfg_scale}


STOPPED = "stopped"  # FidMonitor.measure's answer when a stop request cut the evaluation short


@torch.no_grad()
def rank_fid_features(ema, vae, network: InceptionNetwork, sampler: Sampler, settings: Monitoring, rank: int,
                      world_size: int, channels: int, latent_size: int, batch_size: int,
                      device: torch.device, stop: Optional[dict] = None) -> Optional[np.ndarray]:
    """One rank's share of the FID samples, as pool3 features. Each rank's noise and labels are the
    same at every evaluation, so successive FIDs differ only by the weights; the training RNG is
    untouched. With stop (collective), every rank asks before each batch whether any rank was asked
    to stop, and all return None if so."""
    generator = torch.Generator().manual_seed(settings.global_seed * world_size + rank)
    count = len(range(rank, settings.fid_samples, world_size))
    rounds = math.ceil(len(range(0, settings.fid_samples, world_size)) / batch_size)  # rank 0 has the most
    features = []
    with forked_rng(device):
        torch.manual_seed(settings.global_seed * world_size + rank)
        for start in range(0, rounds * batch_size, batch_size):
            if stop is not None and any_rank_stopping(stop, device):
                return None
            if start >= count:
                continue
            n = min(batch_size, count - start)
            noise = torch.randn(n, channels, latent_size, latent_size, generator=generator).to(device)
            labels = torch.randint(0, settings.num_classes, (n,), generator=generator).to(device)
            latents = generate(ema, sampler, noise, labels, settings.fid_cfg_scale, pixels=vae is None)
            images = to_uint8_images(decode(vae, latents))
            features.append(network(as_uint8_nchw(images, "the FID samples"))[0].numpy())
    return np.concatenate(features) if features else np.zeros((0, 2048), np.float32)


def write_record(metrics_file, record: dict, tracker=None) -> None:
    """One JSON line in metrics.jsonl, and the same numbers to the tracker (rank 0 only; others pass None)."""
    if tracker is not None:
        tracker.log(record)
    if metrics_file is not None:
        try:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        except OSError as error:  # a full disk shows here first: name the file
            raise OSError(error.errno, f"cannot write {metrics_file.name}: {error.strerror}") from None


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@contextmanager
def stop_requests() -> Iterator[dict]:
    """SIGTERM and SIGINT ask the run to stop: it checkpoints at the next check and ends. The
    caller's handlers are back however the run ends."""
    requested = {"name": None}

    def request_stop(signum, frame):
        requested["name"] = signal.Signals(signum).name

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield requested
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def progress_bar(rank: int, initial: int, total: int):
    """A tqdm bar on rank 0 when stderr is a terminal (None otherwise: logs stay clean), closed on exit."""
    if rank != 0 or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm
    bar = tqdm(initial=initial, total=total, unit="step", dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()



def any_rank_stopping(stop: dict, device: torch.device) -> bool:
    """Collective: whether any rank was asked to stop."""
    flag = torch.tensor(float(stop["name"] is not None), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


class Health:
    """A non-finite loss is recorded on the device (no host sync) and found at the next check: one
    all-reduce that also tells every rank whether any rank was asked to stop."""

    def __init__(self, device: torch.device, last_checkpoint: Optional[Path]):
        self.first_bad_step = torch.tensor(NEVER, device=device)
        self.last_checkpoint = last_checkpoint

    def record(self, loss: torch.Tensor, step: int) -> None:
        self.first_bad_step = torch.where(torch.isfinite(loss.detach()) | (self.first_bad_step != NEVER),
                                          self.first_bad_step, step)

    def check(self, stop: dict, train_steps: int) -> bool:
        """Raise on a non-finite loss of any rank; True when any rank was asked to stop."""
        stopping = -float(stop["name"] is not None)
        flags = torch.stack([self.first_bad_step.double(), torch.tensor(stopping, device=self.first_bad_step.device,
                                                                        dtype=torch.float64)])
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        bad_step, stop_flag = flags.tolist()
        if bad_step != NEVER:
            kept = f"the last checkpoint, {self.last_checkpoint}, is intact" if self.last_checkpoint \
                else "no checkpoint was written"
            raise FloatingPointError(f"loss became non-finite at step {int(bad_step)} (seen at step {train_steps}; "
                                     f"the weights are no longer finite and were not saved; {kept}). "
                                     f"Try a lower --lr or --grad-clip")
        return stop_flag < 0


def open_outputs(flags: dict, rank: int, resumed_from: Optional[Path], resumed_step: Optional[int], started: float,
                 scope: ExitStack) -> Outputs:
    """Claim the experiment folder in flags["results_dir"] (rank 0 decides), open the log,
    metrics.jsonl and the tracker of flags["report_to"], which gets the run's flags."""
    experiment_dir, notes = rank_zero_decides(rank, lambda: claim_experiment(flags["results_dir"], flags["model"],
                                                                             resumed_from, scope))
    checkpoint_dir = experiment_dir / "checkpoints"
    notes += rank_zero_decides(rank, lambda: prepare_checkpoint_dir(checkpoint_dir, started))
    logger = create_logger(experiment_dir, rank)
    scope.callback(close_logger, logger)
    logger.info(f"Experiment directory created at {experiment_dir}")
    out = Outputs(experiment_dir, checkpoint_dir, logger, notes=notes)
    if rank == 0:
        out.metrics_file = scope.enter_context(open_metrics(experiment_dir / "metrics.jsonl", resumed_step))
        out.tracker = open_tracker(flags["report_to"], experiment_dir, flags, resumed_step)
        if out.tracker is not None:
            scope.callback(out.tracker.close)
    return out


def prepare_checkpoint_dir(checkpoint_dir: Path, started: float) -> list:
    """Create the folder, clear what a killed checkpoint write left, and find out now, not at the
    first save hours later, whether checkpoints can be written there. Lines for the log."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    removed, freed = remove_stale_temporaries(checkpoint_dir, older_than=started)
    require_writable(checkpoint_dir, "where the checkpoints go")
    if removed:
        return [f"Removed {removed} temporary file(s) of an interrupted checkpoint write ({format_bytes(freed)})"]
    return []


def open_metrics(path: Path, resumed_step: Optional[int]):
    """metrics.jsonl for appending. A resumed run first drops the records a killed run wrote after
    the checkpoint it resumes from, so every step appears once (as TensorBoard's purge does)."""
    if resumed_step is not None and path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= resumed_step]
        if len(kept) != len(lines):
            with atomic_write(path) as handle:
                handle.write("".join(kept).encode())
    return open(path, "a")
