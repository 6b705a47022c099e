"""Train a DiT with DDP: `torchrun --nproc_per_node=N train.py --model DiT-XL/2 --data-path /imagenet/train`.

Does what the official script does (same flags and defaults), and adds: CPU/gloo runs and plain
`python train.py`, any image size, pixel-space or local VAEs, pre-extracted latents, exact resume,
mixed precision, gradient checkpointing, torch.compile, warm-up, clipping, sample grids, metrics,
fine-tuning, gradient accumulation, learning-rate decay, TensorBoard and W&B.

train() reads as the official main(): set-up, then the loop under the same section comments. The
rest of the file is the pieces it calls, in the order it calls them.
"""
import argparse
import json
import math
import random
import resource
import signal
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from copy import deepcopy
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from checkpoints import read_checkpoint
from diffusion import create_diffusion
from files import atomic_torch_save, atomic_write, format_bytes, remove_stale_temporaries
from images import image_folder, save_image_grid, to_uint8_images, unreadable_images
from latents import LatentFeatures, decode, encode_posterior, latent_shape, load_vae, sample_latents, vae_scale
from metrics import InceptionNetwork, as_uint8_nchw, extract, frechet_distance, statistics
from models import BLOCK_DESIGNS, DiT_models
from processes import (
    add_device_flags,
    close_logger,
    create_logger,
    distributed,
    forked_rng,
    rank_zero_decides,
    rank_zero_first,
    require_positive,
    run_cli,
)
from runs import claim_experiment, prune_checkpoints, resume_point, rng_state, set_rng_state
from sampling import SAMPLERS, Sampler, check_guidance, generate
from tracking import REPORT_TO, open_tracker, require_tracker
from weights import load_init_weights, load_weights

HEALTH_CHECK_EVERY = 10  # steps between checks for a non-finite loss or a stop signal (besides log steps)
NEVER = 2 ** 52  # "no non-finite loss yet" (exact in float64, which the check's all-reduce uses)


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


@dataclass
class Data:
    """The training data and what the DiT sees of it."""
    dataset: torch.utils.data.Dataset
    vae: Optional[torch.nn.Module]  # None: pixel space, or latents without sample grids
    scale: float  # latent scaling factor (1 in pixel space)
    channels: int
    latent_size: int


@dataclass
class Outputs:
    """Where the run writes (rank 0; other ranks hold None for the files)."""
    experiment_dir: Path
    checkpoint_dir: Path
    logger: object
    metrics_file: object = None
    tracker: object = None
    notes: list = field(default_factory=list)


# ---- the run -----------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> None:
    check_args(args)
    with distributed(args.device) as (rank, world_size, device), ExitStack() as scope:
        train(args, rank, world_size, device, scope)


def train(args: argparse.Namespace, rank: int, world_size: int, device: torch.device, scope: ExitStack) -> None:
    """The run. What must last until it ends (lock, files, signal handlers, progress bar) is entered
    into scope, so every exit, an exception included, releases it."""
    local_batch = per_process_batch(args, world_size)
    started = time.time()
    torch.backends.cuda.matmul.allow_tf32 = args.tf32  # TF32 is on by default, as in the official script
    torch.backends.cudnn.allow_tf32 = args.tf32
    seed = args.global_seed * world_size + rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)

    # What to resume: decided first, so a damaged checkpoint or a changed flag is reported at once.
    resumed_from, checkpoint, notes = choose_checkpoint(args, rank)
    # Data, VAE and FID tools: built under a forked generator, so the DiT's initialisation is the
    # official one (the official script builds it straight after seeding) whatever else is loaded.
    with forked_rng(device):
        data = load_data(args, rank, world_size, device)
        if data is None:
            return  # --check-data only checks
        fid = FidMonitor(args, rank, device) if args.fid_every else None

    # Create model:
    model = create_model(args, data)
    notes += initialise(model, args, resumed_from, checkpoint, rank, device)
    ema = deepcopy(model).to(device).requires_grad_(False)  # the EMA of the model, for use after training
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    state = TrainState(model, ema, opt, torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16"))
    diffusion = create_diffusion(timestep_respacing="")  # default: 1000 steps, linear noise schedule

    # Setup an experiment folder, claimed only now that everything has been checked:
    out = open_outputs(args, rank, resumed_from, checkpoint["train_steps"] if checkpoint else None, started, scope)
    logger = out.logger
    for note in notes + out.notes:
        logger.info(note)
    logger.info(f"DiT Parameters: {sum(p.numel() for p in model.parameters()):,}")
    if checkpoint is not None:
        for note in restore(state, checkpoint, rank, world_size, device):
            logger.info(note)
        logger.info(f"Resumed from {resumed_from} at step {state.train_steps} (epoch {state.epoch}, "
                    f"batch {state.batches_into_epoch})")
    del checkpoint
    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if resumed_from is None:  # every rank now holds rank 0's weights (DDP broadcast them): the EMA starts there
        update_ema(ema, model, decay=0)
    # Every random number of a step is drawn outside the model, so a compiled model draws as an eager one.
    train_model = torch.compile(ddp_model) if args.compile else ddp_model

    # Setup data:
    sampler = ResumableSampler(data.dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.global_seed)
    # Its own generator: creating an epoch's iterator must not draw from the training stream.
    loader = DataLoader(data.dataset, batch_size=local_batch, shuffle=False, sampler=sampler,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda", drop_last=True,
                        persistent_workers=args.num_workers > 0, generator=torch.Generator().manual_seed(seed))
    steps_per_epoch = sampler.num_samples // local_batch
    max_steps = args.max_steps if args.max_steps is not None else args.epochs * steps_per_epoch
    state.schedule_steps = fix_schedule_length(state, args, max_steps, logger)
    micro = local_batch // args.grad_accum_steps
    micro_batches = [slice(k * micro, (k + 1) * micro) for k in range(args.grad_accum_steps)]
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    logger.info(f"Dataset contains {len(data.dataset):,} images ({args.data_path or args.feature_path}); "
                f"{steps_per_epoch} steps per epoch, {world_size} process(es) on {device}")

    # Prepare models for training:
    model.train()  # important! This enables embedding dropout for classifier-free guidance
    ema.eval()  # EMA model should always be in eval mode
    stop = scope.enter_context(stop_requests())
    progress = scope.enter_context(progress_bar(rank, state.train_steps, max_steps))
    monitor = Monitor(args, out, data, diffusion.num_timesteps, device, fid)
    health = Health(device, resumed_from)

    logger.info(f"Training for {args.epochs} epochs...")
    done = state.train_steps >= max_steps
    while not done and state.epoch < args.epochs:
        sampler.set_epoch(state.epoch)
        sampler.skip_samples = state.batches_into_epoch * local_batch
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            x = to_latents(x, args, data)  # flips (drawn here, so they resume) and the VAE posterior draw
            for group in opt.param_groups:
                group["lr"] = learning_rate(args, state.train_steps, state.schedule_steps)
            t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
            # The batch's other random numbers, drawn once in the order a whole-batch step draws them
            # (training_losses' noise, then the label embedder's dropout) and split over micro-batches.
            noise = torch.randn_like(x)
            drop = (torch.rand(x.shape[0], device=device) < args.class_dropout_prob).long() \
                if args.class_dropout_prob > 0 else None
            opt.zero_grad(set_to_none=True)
            loss = torch.zeros((), device=device)
            for index, part in enumerate(micro_batches):
                labels = dict(y=y[part]) if drop is None else dict(y=y[part], force_drop_ids=drop[part])
                # DDP all-reduces the gradients once, after the last micro-batch's backward.
                with ddp_model.no_sync() if index < len(micro_batches) - 1 else nullcontext():
                    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                        terms = diffusion.training_losses(train_model, x[part], t[part], labels, noise=noise[part])
                        part_loss = terms["loss"].mean() / len(micro_batches)
                    state.scaler.scale(part_loss).backward()
                loss += part_loss.detach()
                monitor.running.add_terms(t[part], terms)
            state.scaler.unscale_(opt)  # a no-op unless fp16's scaler is on: norm and clipping see true gradients
            if args.grad_clip is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            state.scaler.step(opt)
            state.scaler.update()
            update_ema(ema, model, args.ema_decay)

            # Log loss values (summed on the device: no host sync until a log line or a check):
            monitor.running.add_step(loss, grad_norm)
            health.record(loss, state.train_steps + 1)
            state.train_steps += 1
            state.batches_into_epoch += 1
            if progress is not None:
                progress.update(1)
            end_of_epoch = state.batches_into_epoch == steps_per_epoch
            if end_of_epoch:
                state.epoch, state.batches_into_epoch = state.epoch + 1, 0
            at_checkpoint = state.train_steps % args.ckpt_every == 0
            done = state.train_steps >= max_steps or (end_of_epoch and state.epoch >= args.epochs)
            if done or at_checkpoint or state.train_steps % args.log_every == 0 \
                    or state.train_steps % HEALTH_CHECK_EVERY == 0:
                done = health.check(stop, state.train_steps) or done
            monitor.after_step(state, max_steps, rank, world_size, local_batch)

            # Save DiT checkpoint:
            if at_checkpoint or done:
                health.last_checkpoint = save_checkpoint(state, args, out, rank, world_size, device, resumed_from)
            if done or end_of_epoch:
                break

    if stop["name"]:
        logger.info(f"Stopped by {stop['name']} at step {state.train_steps}; resume with --resume auto")
    model.eval()  # important! This disables randomized embedding dropout
    logger.info("Done!")


# ---- set-up --------------------------------------------------------------------------------------

def per_process_batch(args: argparse.Namespace, world_size: int) -> int:
    if args.global_batch_size % world_size:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by the world size "
                         f"{world_size}")
    local_batch = args.global_batch_size // world_size
    if local_batch % args.grad_accum_steps:
        raise ValueError(f"--grad-accum-steps {args.grad_accum_steps} does not divide the per-process batch "
                         f"{local_batch} (--global-batch-size {args.global_batch_size} over {world_size} processes)")
    return local_batch


def choose_checkpoint(args: argparse.Namespace, rank: int) -> tuple[Optional[Path], Optional[dict], list]:
    """(path, contents, lines for the log) of the checkpoint to resume, decided on rank 0 and read
    by every rank; (None, None, notes) to start afresh."""
    decided = {}

    def decide():
        path, decided["checkpoint"], notes = resume_point(args)
        return path, notes

    path, notes = rank_zero_decides(rank, decide)
    if path is None:
        return None, None, notes
    return path, decided["checkpoint"] if rank == 0 else read_checkpoint(path), notes


def load_data(args: argparse.Namespace, rank: int, world_size: int, device: torch.device) -> Optional[Data]:
    """The dataset (images or latents) and the VAE; None after --check-data has checked every image."""
    if args.feature_path is not None:
        dataset = LatentFeatures(args.feature_path)
        dataset.check_matches(args.image_size, args.num_classes)
        args.vae = dataset.meta["vae"]  # the VAE that made the latents: recorded in checkpoints, used by grids
        vae = dataset.load_vae(device) if args.sample_every else None  # only sample grids decode
        data = Data(dataset, vae, dataset.scale, dataset.channels, dataset.latent_size)
    else:
        dataset = image_folder(args.data_path, args.image_size)
        check_image_files([path for path, _ in dataset.samples], args.check_data, rank, world_size)
        if args.check_data:
            if rank == 0:
                print(f"--check-data: all {len(dataset):,} images under {args.data_path} decode")
            return None
        if len(dataset.classes) > args.num_classes:
            raise ValueError(f"--data-path has {len(dataset.classes)} class folders but --num-classes is "
                             f"{args.num_classes}")
        vae = load_vae(args.vae, device)
        data = Data(dataset, vae, vae_scale(vae) if vae is not None else 1.0, *latent_shape(vae, args.image_size))
    if len(dataset) < args.global_batch_size:
        raise ValueError(f"the dataset has {len(dataset)} images, fewer than one global batch of "
                         f"{args.global_batch_size}")
    return data


def create_model(args: argparse.Namespace, data: Data) -> torch.nn.Module:
    try:
        return DiT_models[args.model](input_size=data.latent_size, in_channels=data.channels,
                                      num_classes=args.num_classes, class_dropout_prob=args.class_dropout_prob,
                                      gradient_checkpointing=args.grad_checkpointing, block=args.block)
    except ValueError as error:
        raise ValueError(f"{error} (the model's input for --image-size {args.image_size})") from None


def initialise(model: torch.nn.Module, args: argparse.Namespace, resumed_from: Optional[Path], checkpoint,
               rank: int, device: torch.device) -> list:
    """--init-from's weights into a new run (rank 0 downloads first); lines for the log. Reading the
    source draws nothing from the training stream."""
    if args.init_from is None:
        return []
    if checkpoint is not None:
        return [f"--resume wins over --init-from: continuing {resumed_from} (started from {args.init_from})"]
    with forked_rng(device):
        notes = rank_zero_decides(rank, lambda: load_init_weights(model, args.init_from))
        if rank != 0:
            load_init_weights(model, args.init_from)
    return notes


def open_outputs(args: argparse.Namespace, rank: int, resumed_from: Optional[Path], resumed_step: Optional[int],
                 started: float, scope: ExitStack) -> Outputs:
    """Claim the experiment folder (rank 0 decides), open the log, metrics.jsonl and the tracker."""
    experiment_dir, notes = rank_zero_decides(rank, lambda: claim_experiment(args, resumed_from, scope))
    checkpoint_dir = experiment_dir / "checkpoints"
    if rank == 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        removed, freed = remove_stale_temporaries(checkpoint_dir, older_than=started)
        if removed:
            notes.append(f"Removed {removed} temporary file(s) of an interrupted checkpoint write "
                         f"({format_bytes(freed)})")
    dist.barrier()
    logger = create_logger(experiment_dir, rank)
    scope.callback(close_logger, logger)
    logger.info(f"Experiment directory created at {experiment_dir}")
    out = Outputs(experiment_dir, checkpoint_dir, logger, notes=notes)
    if rank == 0:
        out.metrics_file = scope.enter_context(open_metrics(experiment_dir / "metrics.jsonl", resumed_step))
        out.tracker = open_tracker(args.report_to, experiment_dir, args, resumed_step)
        if out.tracker is not None:
            scope.callback(out.tracker.close)
    return out


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


def restore(state: TrainState, checkpoint: dict, rank: int, world_size: int, device: torch.device) -> list:
    """Weights, optimizer, scaler, counters and this rank's generators from a checkpoint of ours;
    lines for the log."""
    source = f"--resume (step {checkpoint['train_steps']})"
    load_weights(state.model, checkpoint["model"], source)  # a mismatch names tensors and flags
    load_weights(state.ema, checkpoint["ema"], source)
    state.opt.load_state_dict(checkpoint["opt"])
    state.scaler.load_state_dict(checkpoint["scaler"])
    state.train_steps, state.epoch = checkpoint["train_steps"], checkpoint["epoch"]
    state.batches_into_epoch = checkpoint["position"]
    state.schedule_steps = checkpoint.get("schedule_steps", 0)
    if len(checkpoint["rng"]) == world_size:
        set_rng_state(checkpoint["rng"][rank], device)
        return []
    return [f"Checkpoint came from {len(checkpoint['rng'])} processes, not {world_size}: continuing with fresh "
            f"per-rank seeds (the run will not repeat bit for bit)"]


def fix_schedule_length(state: TrainState, args: argparse.Namespace, max_steps: int, logger) -> int:
    """A decaying learning rate keeps the length it had when the run started, so a resumed run with
    another --max-steps continues the same curve (after its end the rate stays at --lr-min)."""
    if not state.schedule_steps:
        return max_steps
    if state.schedule_steps != max_steps and args.lr_schedule != "constant":
        logger.info(f"The {args.lr_schedule} schedule keeps the length of {state.schedule_steps} steps it was "
                    f"started with (--max-steps is now {max_steps}); after it the rate stays at --lr-min {args.lr_min}")
    return state.schedule_steps


# ---- the loop's pieces ---------------------------------------------------------------------------

def to_latents(x: torch.Tensor, args: argparse.Namespace, data: Data) -> torch.Tensor:
    """What the DiT trains on: a batch flipped per sample (drawn from the main process's generator,
    so the choice is saved and resumed; nothing is drawn with --no-random-flip), then a draw from
    the VAE posterior, scaled (the stored one with --feature-path)."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5 if args.random_flip else None
    if args.feature_path is not None:  # x holds (unflipped, flipped) x (mean, std)
        chosen = x[:, 0] if flip is None else torch.where(flip[:, None, None, None, None], x[:, 1], x[:, 0])
        return sample_latents(chosen[:, 0], chosen[:, 1], data.scale)
    if flip is not None:
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return sample_latents(*encode_posterior(data.vae, x), data.scale) if data.vae is not None else x


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float = 0.9999) -> None:
    """ema = decay * ema + (1 - decay) * model for every trained parameter, in two fused foreach ops.

    The fixed position table is left alone: averaging a constant with itself only adds rounding.
    """
    pairs = [(e, p.detach()) for e, p in zip(ema_model.parameters(), model.parameters()) if p.requires_grad]
    ema_params, model_params = [e for e, _ in pairs], [p for _, p in pairs]
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, model_params, alpha=1 - decay)


def learning_rate(args: argparse.Namespace, train_steps: int, total_steps: int) -> float:
    """Linear warm-up over --warmup-steps, then constant (the official schedule), or a cosine or
    linear decay to --lr-min at total_steps. A function of the step alone, so a resumed run
    continues the schedule."""
    if args.warmup_steps and train_steps < args.warmup_steps:
        return args.lr * (train_steps + 1) / args.warmup_steps
    if args.lr_schedule == "constant":
        return args.lr
    progress = min(1.0, (train_steps - args.warmup_steps) / max(total_steps - args.warmup_steps, 1))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if args.lr_schedule == "cosine" else 1 - progress
    return args.lr_min + (args.lr - args.lr_min) * shape


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way, so a resumed run sees the same batches."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip_samples = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip_samples:])

    def __len__(self):
        return self.num_samples - self.skip_samples


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


def save_checkpoint(state: TrainState, args: argparse.Namespace, out: Outputs, rank: int, world_size: int,
                    device: torch.device, resumed_from: Optional[Path]) -> Path:
    """Collective: checks the ranks agree, gathers their RNG states; rank 0 writes atomically."""
    check_ranks_agree({"model": state.model, "EMA": state.ema}, state.train_steps)
    rngs = [None] * world_size
    dist.all_gather_object(rngs, rng_state(device))
    path = out.checkpoint_dir / f"{state.train_steps:07d}.pt"
    if rank == 0:
        atomic_torch_save({
            "model": state.model.state_dict(), "ema": state.ema.state_dict(), "opt": state.opt.state_dict(),
            "scaler": state.scaler.state_dict(), "args": vars(args), "train_steps": state.train_steps,
            "epoch": state.epoch, "position": state.batches_into_epoch, "schedule_steps": state.schedule_steps,
            "rng": rngs,
        }, path)
        out.logger.info(f"Saved checkpoint to {path} (model and EMA identical on all {world_size} ranks)")
        if args.keep_last is not None:
            removed = prune_checkpoints(out.checkpoint_dir, args.keep_last, args.keep_every, keep=resumed_from)
            if removed:
                out.logger.info(f"Deleted {', '.join(p.name for p in removed)} (--keep-last {args.keep_last})")
    dist.barrier()
    return path


@torch.no_grad()
def check_ranks_agree(models: dict, step: int) -> None:
    """Raise unless every named model holds the same weights on every rank.

    Each tensor is summarised by its sum and its norm (no copy of the weights is made); one
    all-reduce of [summary, -summary] with MAX gives the largest and smallest value across ranks.
    """
    summaries = torch.stack([value for model in models.values() for p in model.parameters()
                             for value in (p.detach().sum(), torch.linalg.vector_norm(p.detach()))]).double()
    extremes = torch.cat([summaries, -summaries])
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    largest, minus_smallest = extremes.chunk(2)
    differs = (largest != -minus_smallest).tolist()
    if any(differs):
        counts = [2 * sum(1 for _ in model.parameters()) for model in models.values()]
        bounds = np.cumsum([0] + counts)
        names = [name for name, lo, hi in zip(models, bounds, bounds[1:]) if any(differs[lo:hi])]
        raise RuntimeError(f"the ranks' {' and '.join(names)} weights differ at step {step}; "
                           f"DDP should keep them identical (a rank ran other code or data)")


# ---- monitoring: log lines, metrics.jsonl, trackers, sample grids, FID -----------------------------

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
        quartile = t * 4 // self.num_timesteps
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

    def __init__(self, args: argparse.Namespace, out: Outputs, data: Data, num_timesteps: int, device: torch.device,
                 fid: Optional["FidMonitor"]):
        self.args, self.out, self.data, self.device, self.fid = args, out, data, device, fid
        self.num_timesteps = num_timesteps
        self.running, self.start_time = RunningMetrics(num_timesteps, device), time.time()
        generator = torch.Generator().manual_seed(args.global_seed)  # the same noise and labels for every grid
        count = args.sample_grid_size
        self.grid_noise = torch.randn(count, data.channels, data.latent_size, data.latent_size,
                                      generator=generator).to(device)
        self.grid_labels = (torch.arange(count) % args.num_classes).to(device)
        self.grid_sampler = Sampler("ddpm", args.sample_steps, flag="--sample-steps")

    def after_step(self, state: TrainState, max_steps: int, rank: int, world_size: int, local_batch: int) -> None:
        args, step = self.args, state.train_steps
        if step % args.log_every == 0:
            self.log_line(state, max_steps)
        evaluated = time.time()
        if args.sample_every and step % args.sample_every == 0 and rank == 0:
            grid = self.out.experiment_dir / "samples" / f"{step:07d}.png"
            self.write_sample_grid(state.ema, grid)
            if self.out.tracker is not None:
                self.out.tracker.log_image("samples", grid, step)
        if args.fid_every and step % args.fid_every == 0:
            record = self.fid.measure(state.ema, self.data, args, rank, world_size, local_batch, self.device)
            if rank == 0:
                record = {"step": step, **record, "fid_seconds": time.time() - evaluated}
                self.out.logger.info(f"(step={step:07d}) FID-{args.fid_samples}: {record['fid']:.4f} (EMA weights, "
                                     f"{args.fid_sampler} {args.fid_steps} steps, cfg-scale {args.fid_cfg_scale}, "
                                     f"{record['fid_seconds']:.1f} s)")
                write_record(self.out.metrics_file, record, self.out.tracker)
        self.start_time += time.time() - evaluated  # throughput counts training only

    def log_line(self, state: TrainState, max_steps: int) -> None:
        """The official log line (loss averaged over ranks and steps, steps/s), with throughput, peak
        memory and the training time left at this speed; metrics.jsonl and the tracker also get the
        learning rate, gradient norm and the loss terms by timestep quartile."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        steps_per_sec = self.running.steps / (time.time() - self.start_time)
        reduced = self.running.reduce()
        record = {"step": state.train_steps, "loss": reduced.pop("loss"), "steps_per_sec": steps_per_sec,
                  "images_per_sec": steps_per_sec * self.args.global_batch_size,
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
            torch.manual_seed(self.args.global_seed)
            latents = generate(ema, self.grid_sampler, self.grid_noise, self.grid_labels, self.args.sample_cfg_scale,
                               pixels=self.data.vae is None)
        save_image_grid(decode(self.data.vae, latents), path, nrow=int(math.ceil(math.sqrt(len(self.grid_noise)))))


class FidMonitor:
    """--fid-every: the FID network (rank 0 downloads it first, if it must), the reference
    statistics, and FID of EMA samples drawn in shares across the ranks."""

    def __init__(self, args: argparse.Namespace, rank: int, device: torch.device):
        self.sampler = Sampler(args.fid_sampler, args.fid_steps, flag="--fid-steps")
        self.network = rank_zero_first(rank, lambda: InceptionNetwork(args.inception, device))
        # Statistics (evaluate.py --save-stats, ADM's batches) or images, whose statistics are computed here.
        self.reference = extract(self.network, args.fid_ref, progress=False)

    def measure(self, ema, data: Data, args, rank: int, world_size: int, batch_size: int, device) -> Optional[dict]:
        """Collective: on rank 0 the FID record, None elsewhere."""
        local = rank_fid_features(ema, data.vae, self.network, self.sampler, args, rank, world_size, data.channels,
                                  data.latent_size, batch_size, device)
        gathered = [None] * world_size
        dist.all_gather_object(gathered, local)
        if rank != 0:
            return None
        return {"fid": frechet_distance(statistics(np.concatenate(gathered)), self.reference),
                "fid_samples": args.fid_samples, "fid_sampler": args.fid_sampler, "fid_steps": args.fid_steps,
                "fid_cfg_scale": args.fid_cfg_scale}


@torch.no_grad()
def rank_fid_features(ema, vae, network: InceptionNetwork, sampler: Sampler, args, rank: int, world_size: int,
                      channels: int, latent_size: int, batch_size: int, device: torch.device) -> np.ndarray:
    """One rank's share of the FID samples, as pool3 features. Each rank's noise and labels are the
    same at every evaluation, so successive FIDs differ only by the weights; the training RNG is
    untouched."""
    generator = torch.Generator().manual_seed(args.global_seed * world_size + rank)
    count = len(range(rank, args.fid_samples, world_size))
    features = []
    with forked_rng(device):
        torch.manual_seed(args.global_seed * world_size + rank)
        for start in range(0, count, batch_size):
            n = min(batch_size, count - start)
            noise = torch.randn(n, channels, latent_size, latent_size, generator=generator).to(device)
            labels = torch.randint(0, args.num_classes, (n,), generator=generator).to(device)
            latents = generate(ema, sampler, noise, labels, args.fid_cfg_scale, pixels=vae is None)
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


def check_image_files(paths: list, decode: bool, rank: int, world_size: int) -> None:
    """Every rank opens its share of the image files (headers only, or in full with --check-data);
    any unreadable one stops every rank with one line naming them all, before training starts."""
    found = [None] * world_size
    dist.all_gather_object(found, unreadable_images(paths[rank::world_size], decode))
    bad = sorted(name for part in found for name in part)
    if bad:
        raise ValueError(f"{len(bad)} of the {len(paths):,} images under --data-path cannot be read: "
                         f"{'; '.join(bad)}")


# ---- the command line ----------------------------------------------------------------------------

def check_args(args: argparse.Namespace) -> None:
    """Every flag's range, checked before any work starts; the sampling flags of grids and FID with
    the rules of the sampling scripts."""
    if args.model not in DiT_models:
        raise ValueError(f"--model {args.model!r} is unknown; choose from {', '.join(DiT_models)}")
    if args.image_size <= 0 or (args.vae != "none" and args.image_size % 8):
        raise ValueError(f"--image-size {args.image_size} must be a positive multiple of 8 with a VAE")
    if args.num_classes < 1:
        raise ValueError(f"--num-classes must be at least 1, got {args.num_classes}")
    if args.feature_path is None and args.data_path is None:
        raise ValueError("--data-path is required (or --feature-path with latents from extract_features.py)")
    require_positive(args, "global_batch_size", "grad_accum_steps", "epochs", "log_every", "ckpt_every", "max_steps",
                     "keep_last", "keep_every", "sample_steps", "sample_grid_size", "fid_samples", "fid_steps")
    for flag in ("sample_every", "fid_every", "warmup_steps"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0 (0: never), got {getattr(args, flag)}")
    # AdamW's first step divides the rate by 1 - beta1 = 0.1 in float32; anything larger cannot be represented.
    require_in_range(args, "lr", 0, float(torch.finfo(torch.float32).max) * 0.1,
                     "AdamW's first step divides it by 0.1 in float32", high_open=True)
    require_in_range(args, "weight_decay", 0, math.inf)
    require_in_range(args, "class_dropout_prob", 0, 1, "1 would drop every label", high_open=True)
    require_in_range(args, "ema_decay", 0, 1, high_open=True)
    if args.grad_clip is not None and not (math.isfinite(args.grad_clip) and args.grad_clip > 0):
        raise ValueError(f"--grad-clip must be a positive gradient norm, got {args.grad_clip} (a negative one "
                         f"reverses the gradient, 0 stops learning)")
    if args.keep_every is not None and args.keep_last is None:
        raise ValueError("--keep-every only applies with --keep-last (without it every checkpoint is kept)")
    if args.lr_schedule != "constant" and not 0 <= args.lr_min <= args.lr:
        raise ValueError(f"--lr-min must lie in [0, --lr {args.lr}], got {args.lr_min}")
    grid_sampler = Sampler("ddpm", args.sample_steps, flag="--sample-steps")
    check_guidance(args.sample_cfg_scale, None, grid_sampler, "--sample-cfg-scale", min_cfg_scale=1.0)
    fid_sampler = Sampler(args.fid_sampler, args.fid_steps, flag="--fid-steps")
    check_guidance(args.fid_cfg_scale, None, fid_sampler, "--fid-cfg-scale", min_cfg_scale=1.0)
    if args.fid_every:
        if args.fid_ref is None:
            raise ValueError("--fid-every needs --fid-ref STATS.npz (write one with evaluate.py DATA --save-stats "
                             "STATS.npz)")
        if not Path(args.fid_ref).is_file():
            raise ValueError(f"--fid-ref {args.fid_ref}: no such file (write one with evaluate.py DATA --save-stats)")
        if args.fid_samples < 2:
            raise ValueError(f"--fid-samples must be at least 2 for a covariance, got {args.fid_samples}")
    require_tracker(args.report_to)


def require_in_range(args: argparse.Namespace, flag: str, low: float, high: float, why: str = "",
                     high_open: bool = False) -> None:
    """A float flag that must be a number in [low, high] (or [low, high))."""
    value = getattr(args, flag)
    inside = math.isfinite(value) and low <= value and (value < high if high_open else value <= high)
    if not inside:
        bracket = ")" if high_open else "]"
        raise ValueError(f"--{flag.replace('_', '-')} must lie in [{low:g}, {high:g}{bracket}, got {value}"
                         + (f" ({why})" if why else ""))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a DiT (DDP; torchrun or plain python).")
    official = parser.add_argument_group("official flags (same names and defaults)")
    official.add_argument("--data-path", type=str, default=None, help="ImageFolder root: one sub-folder per class")
    official.add_argument("--results-dir", type=str, default="results")
    official.add_argument("--model", type=str, choices=list(DiT_models), default="DiT-XL/2")
    official.add_argument("--image-size", type=int, default=256, help="pixels; any multiple of 8 with a VAE")
    official.add_argument("--num-classes", type=int, default=1000)
    official.add_argument("--epochs", type=int, default=1400)
    official.add_argument("--global-batch-size", type=int, default=256)
    official.add_argument("--global-seed", type=int, default=0)
    official.add_argument("--vae", type=str, default="ema",
                          help="ema | mse | none (pixel space) | local AutoencoderKL folder")
    official.add_argument("--num-workers", type=int, default=4)
    official.add_argument("--log-every", type=int, default=100)
    official.add_argument("--ckpt-every", type=int, default=50_000)

    extra = parser.add_argument_group("additions")
    extra.add_argument("--block", choices=BLOCK_DESIGNS, default="adaln-zero",
                       help="conditioning design of the paper's Section 3 (adaln-zero: the official DiT)")
    extra.add_argument("--feature-path", type=str, default=None, help="latents written by extract_features.py")
    extra.add_argument("--resume", type=str, default=None, help="checkpoint path, or 'auto' for the latest one")
    extra.add_argument("--init-from", type=str, default=None,
                       help="start from these weights (an official name, a checkpoint, a state dict, .safetensors "
                            "or a diffusers folder); a label or position table of another size is re-initialised")
    extra.add_argument("--allow-changed-args", action="store_true",
                       help="resume although flags other than run length, logging and monitoring changed")
    extra.add_argument("--check-data", action="store_true", help="decode every image of --data-path, report, and exit")
    extra.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total")
    extra.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    extra.add_argument("--grad-checkpointing", action="store_true")
    extra.add_argument("--grad-accum-steps", type=int, default=1,
                       help="split each process's batch into K micro-batches, one optimizer step for all")
    extra.add_argument("--compile", action="store_true", help="torch.compile the model")
    extra.add_argument("--grad-clip", type=float, default=None, help="max gradient norm")
    extra.add_argument("--lr", type=float, default=1e-4)
    extra.add_argument("--weight-decay", type=float, default=0.0)
    extra.add_argument("--ema-decay", type=float, default=0.9999)
    extra.add_argument("--warmup-steps", type=int, default=0)
    extra.add_argument("--lr-schedule", choices=["constant", "cosine", "linear"], default="constant",
                       help="after warm-up: constant (official), or decay to --lr-min at the last step")
    extra.add_argument("--lr-min", type=float, default=0.0, help="the learning rate a decay ends at")
    extra.add_argument("--keep-last", type=int, default=None,
                       help="keep only the newest N checkpoints (older ones are deleted once a newer one is written)")
    extra.add_argument("--keep-every", type=int, default=None, help="with --keep-last, also keep every M-th step's")
    extra.add_argument("--class-dropout-prob", type=float, default=0.1)
    extra.add_argument("--no-random-flip", dest="random_flip", action="store_false",
                       help="no horizontal flips (for data where mirroring changes meaning, like digits)")
    extra.add_argument("--sample-every", type=int, default=0, help="write an EMA sample grid every K steps (0: never)")
    extra.add_argument("--sample-steps", type=int, default=50, help="sampling steps for those grids")
    extra.add_argument("--sample-cfg-scale", type=float, default=4.0)
    extra.add_argument("--sample-grid-size", type=int, default=16)
    extra.add_argument("--fid-every", type=int, default=0, help="FID of EMA samples every K steps (0: never)")
    extra.add_argument("--fid-ref", type=str, default=None,
                       help="reference statistics (evaluate.py --save-stats, or ADM's), or images (.npz arr_0)")
    extra.add_argument("--fid-samples", type=int, default=5000, help="samples per FID, split over the ranks")
    extra.add_argument("--fid-sampler", choices=SAMPLERS, default="ddim", help="sampler for those samples")
    extra.add_argument("--fid-steps", type=int, default=50, help="sampling steps for those samples")
    extra.add_argument("--fid-cfg-scale", type=float, default=1.0,
                       help="guidance for them (1: none, as the paper's curves)")
    extra.add_argument("--inception", type=str, default=None, help="local FID network weights (default: download)")
    extra.add_argument("--report-to", choices=REPORT_TO, default="none",
                       help="also send metrics and sample grids to TensorBoard or W&B (optional installs)")
    add_device_flags(parser, tf32_help="TF32 matmuls and convolutions on Ampere+ GPUs (on by default, as in the "
                                       "official script)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args())
