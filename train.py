"""Train a DiT with DDP: `torchrun --nproc_per_node=N train.py --model DiT-XL/2 --data-path /imagenet/train`.

Does what the official script does (same flags and defaults), and adds: CPU/gloo runs and plain
`python train.py`, any image size, pixel-space or local VAEs, pre-extracted latents, exact resume,
mixed precision, gradient checkpointing, torch.compile, warm-up, clipping, sample grids, metrics,
fine-tuning, gradient accumulation, learning-rate decay, TensorBoard and W&B.
"""
import argparse
import errno
import fcntl
import json
import math
import random
import resource
import signal
import sys
import time
from contextlib import ExitStack, nullcontext
from copy import deepcopy
from datetime import timedelta
from glob import glob
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from diffusion import create_diffusion
from download import read_checkpoint
from evaluate import InceptionNetwork, as_uint8_nchw, check_statistics, frechet_distance, read_npz, statistics
from files import atomic_torch_save, format_bytes, remove_stale_temporaries
from images import image_folder, save_image_grid, to_uint8_images, unreadable_images
from latents import LatentFeatures, decode, encode_posterior, latent_shape, load_vae, sample_latents, vae_scale
from models import BLOCK_DESIGNS, DiT_models
from processes import close_logger, create_logger, distributed, forked_rng, rank_zero_decides, require_positive, run_cli
from sampling import SAMPLERS, guided_batch, run_sampler, sampling_diffusion
from tracking import REPORT_TO, open_tracker, require_tracker
from weights import load_init_weights, load_weights


# ---- the pieces of one run -----------------------------------------------------------------------

HEALTH_CHECK_EVERY = 10  # steps between checks for a non-finite loss or a stop signal (besides log steps)
NEVER = 2 ** 52  # "no non-finite loss yet" (exact in float64, which the check's all-reduce uses)

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
        self.skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self):
        return self.num_samples - self.skip


def rng_state(device: torch.device) -> dict:
    """Every generator a training step draws from, as plain tensors and lists (weights_only-safe)."""
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# Flags a resumed run may change (each change is logged): how long it runs, and how often and how
# it logs, saves, samples and evaluates. The FIXED ones define the model and its inputs; any other
# change needs --allow-changed-args. The ones in NOT_COMPARED say where and how to resume.
FREE_TO_CHANGE = {"max_steps", "epochs", "log_every", "ckpt_every", "keep_last", "keep_every", "num_workers", "sample_every", "sample_steps",
                  "sample_cfg_scale", "sample_grid_size", "fid_every", "fid_ref", "fid_samples", "fid_sampler", "fid_steps",
                  "fid_cfg_scale", "inception", "report_to"}
FIXED = ("model", "block", "image_size", "num_classes", "vae", "feature_path")
NOT_COMPARED = {"resume", "results_dir", "allow_changed_args", "check_data", "init_from"}


def changed_args(saved: dict, args: argparse.Namespace) -> tuple[list, list, list]:
    """(fixed, free, other) flags whose value differs from the saved run's, as '--flag old -> new'.
    Flags the checkpoint does not record (an older version) are not compared; with --feature-path
    the latents decide the VAE."""
    current = vars(args)
    ignored = NOT_COMPARED | ({"vae"} if current.get("feature_path") is not None else set())
    fixed, free, other = [], [], []
    for key in sorted(saved.keys() & current.keys() - ignored):
        if saved[key] != current[key]:
            change = f"--{key.replace('_', '-')} {saved[key]} -> {current[key]}"
            (fixed if key in FIXED else free if key in FREE_TO_CHANGE else other).append(change)
    return fixed, free, other


def resume_point(args: argparse.Namespace) -> tuple[Optional[Path], Optional[dict], list]:
    """(checkpoint path, its contents, lines for the log) for --resume, or (None, None, []) to start
    afresh. 'auto' takes the newest experiment of this model that has checkpoints and its newest
    readable checkpoint: an unreadable one is moved aside as NAME.corrupt and the one before it is
    tried. The saved flags are compared with these (changed_args). Runs on rank 0 only."""
    if args.resume is None:
        return None, None, []
    notes = []
    if args.resume == "auto":
        suffix = "-" + args.model.replace("/", "-")
        folders = [f for f in sorted(Path(args.results_dir).glob(f"*{suffix}"), reverse=True)
                   if any((f / "checkpoints").glob("*.pt"))]
        if not folders:
            return None, None, [f"--resume auto: no checkpoint of {args.model} in {args.results_dir}; starting afresh"]
        path = checkpoint = None
        for candidate in sorted((folders[0] / "checkpoints").glob("*.pt"), reverse=True):
            try:
                checkpoint, path = read_checkpoint(candidate), candidate
                break
            except ValueError as error:  # truncated, overwritten, not a checkpoint at all
                aside = candidate.with_name(candidate.name + ".corrupt")
                candidate.rename(aside)
                notes.append(f"{error}; moved it aside to {aside.name}, trying the checkpoint before it")
        if path is None:
            raise ValueError(f"--resume auto: no checkpoint in {folders[0] / 'checkpoints'} can be read "
                             f"({'; '.join(notes)})")
    else:
        path = Path(args.resume)
        if not path.is_file():
            raise ValueError(f"--resume {args.resume}: no such checkpoint file")
        checkpoint = read_checkpoint(path)  # a damaged or foreign file is a ValueError naming it
    check_resumable(checkpoint, path)
    fixed, free, other = changed_args(checkpoint["args"], args)
    if fixed:
        raise ValueError(f"--resume {path}: the run was started with other values of flags that define the model "
                         f"and its data ({'; '.join(fixed)}); start a new run for these")
    if other and not args.allow_changed_args:
        raise ValueError(f"--resume {path}: flags differ from the run's ({'; '.join(other)}); pass the run's values, "
                         f"or --allow-changed-args to continue it with the new ones")
    if free or other:
        notes.append(f"Continuing with changed flags: {'; '.join(free + other)}")
    return path, checkpoint, notes


def check_resumable(checkpoint, path: Path) -> None:
    """Only a checkpoint of this train.py holds what an exact resume needs."""
    if not isinstance(checkpoint, dict) or "train_steps" not in checkpoint or "rng" not in checkpoint:
        kind = "an official train.py checkpoint" if isinstance(checkpoint, dict) and "opt" in checkpoint else "not a checkpoint of this train.py"
        raise ValueError(f"--resume {path}: {kind}; it holds no step counter or RNG state, so it cannot "
                         f"be resumed exactly (sample from it with sample.py --ckpt, or start a new run)")


def claim_experiment(args: argparse.Namespace, resumed: Optional[Path], scope: ExitStack) -> tuple[Path, list]:
    """(the folder this run writes into, lines for the log), locked until the run ends (rank 0).
    A resumed run continues its checkpoint's experiment; a new one reuses the newest folder of its
    model if that run died before its first checkpoint, else takes the next number."""
    if resumed is not None and resumed.parent.name == "checkpoints":
        folder = resumed.parent.parent
        if not lock_experiment(folder, scope):
            raise ValueError(f"--resume: {folder} is in use by another run that is still alive (it holds "
                             f"{folder / '.lock'}); stop that run first")
        return folder, []
    root = Path(args.results_dir)
    root.mkdir(parents=True, exist_ok=True)
    suffix = "-" + args.model.replace("/", "-")
    newest = max(root.glob(f"*{suffix}"), default=None)
    if newest is not None and not any(not p.name.startswith(".") for p in (newest / "checkpoints").glob("*")) \
            and lock_experiment(newest, scope):
        return newest, [f"Reusing {newest}: the run that made it stopped before writing a checkpoint"]
    index = len(glob(f"{root}/*"))  # the official numbering; a taken number (a folder was deleted, or a
    while True:                      # run starting beside this one took it) moves on to the next
        folder = root / f"{index:03d}{suffix}"
        index += 1
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        if lock_experiment(folder, scope):
            return folder, []


def lock_experiment(folder: Path, scope: ExitStack) -> bool:
    """Hold an exclusive lock on folder/.lock for as long as `scope` lasts; False if a live process
    holds it. The OS drops the lock when its holder dies, kill -9 included. On a file system
    without locks the folder is taken unlocked."""
    handle = scope.enter_context(open(folder / ".lock", "a"))
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
    return True


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
        raise ValueError(f"{len(bad)} of the {len(paths):,} images under --data-path cannot be read: {'; '.join(bad)}")


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be wrong with the command line, found before any work starts."""
    if args.model not in DiT_models:
        raise ValueError(f"--model {args.model!r} is unknown; choose from {', '.join(DiT_models)}")
    if args.image_size <= 0 or (args.vae != "none" and args.image_size % 8):
        raise ValueError(f"--image-size {args.image_size} must be a positive multiple of 8 with a VAE")
    if args.num_classes < 1:
        raise ValueError(f"--num-classes must be at least 1, got {args.num_classes}")
    if args.feature_path is None and args.data_path is None:
        raise ValueError("--data-path is required (or --feature-path with latents from extract_features.py)")
    require_positive(args, "global_batch_size", "grad_accum_steps", "epochs", "log_every", "ckpt_every", "max_steps", "keep_last",
                     "keep_every", "sample_steps", "sample_grid_size", "fid_samples", "fid_steps")
    if args.keep_every is not None and args.keep_last is None:
        raise ValueError("--keep-every only applies with --keep-last (without it every checkpoint is kept)")
    if args.lr_schedule != "constant" and not 0 <= args.lr_min <= args.lr:
        raise ValueError(f"--lr-min must lie in [0, --lr {args.lr}], got {args.lr_min}")
    if args.fid_every and args.fid_ref is None:
        raise ValueError("--fid-every needs --fid-ref STATS.npz (write one with evaluate.py DATA --save-stats STATS.npz)")
    if not 0 <= args.ema_decay < 1:
        raise ValueError(f"--ema-decay must lie in [0, 1), got {args.ema_decay}")
    require_tracker(args.report_to)


# ---- the run -----------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> None:
    check_args(args)
    with distributed(args.device) as (rank, world_size, device), ExitStack() as scope:
        train(args, rank, world_size, device, scope)


def train(args: argparse.Namespace, rank: int, world_size: int, device: torch.device, scope: ExitStack) -> None:
    """The run; what it must hold until it ends (the experiment's lock) is entered into scope."""
    if args.global_batch_size % world_size:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by the world size {world_size}")
    local_batch = args.global_batch_size // world_size
    if local_batch % args.grad_accum_steps:
        raise ValueError(f"--grad-accum-steps {args.grad_accum_steps} does not divide the per-process batch "
                         f"{local_batch} (--global-batch-size {args.global_batch_size} over {world_size} processes)")
    started = time.time()
    torch.backends.cuda.matmul.allow_tf32 = args.tf32  # TF32 is on by default, as in the official script
    torch.backends.cudnn.allow_tf32 = args.tf32
    seed = args.global_seed * world_size + rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)

    # What to resume: decided first, so a damaged checkpoint or a changed flag is reported at once.
    loaded = {}

    def choose_checkpoint():
        path, loaded["checkpoint"], notes = resume_point(args)
        return path, notes

    checkpoint_path, resume_notes = rank_zero_decides(rank, choose_checkpoint)
    checkpoint = loaded.get("checkpoint") if rank == 0 or checkpoint_path is None else read_checkpoint(checkpoint_path)

    # Data, VAE and model geometry: every error here comes before any training work. Nothing built
    # here draws from the training generators, so the DiT's initialisation is the official one (the
    # official script builds it straight after seeding) whatever the run also loads.
    with forked_rng(device):
        if args.feature_path is not None:
            dataset = LatentFeatures(args.feature_path)
            dataset.check_matches(args.image_size, args.num_classes)
            args.vae = dataset.meta["vae"]  # the VAE that made the latents: recorded in checkpoints, used by grids
            vae = load_vae(args.vae, device) if args.sample_every else None  # only sample grids decode
            channels, latent_size = dataset.channels, dataset.latent_size
            scale = dataset.scale
        else:
            dataset = image_folder(args.data_path, args.image_size)
            check_image_files([path for path, _ in dataset.samples], args.check_data, rank, world_size)
            if args.check_data:
                if rank == 0:
                    print(f"--check-data: all {len(dataset):,} images under {args.data_path} decode")
                return
            if len(dataset.classes) > args.num_classes:
                raise ValueError(f"--data-path has {len(dataset.classes)} class folders but --num-classes is {args.num_classes}")
            vae = load_vae(args.vae, device)
            channels, latent_size = latent_shape(vae, args.image_size)
            scale = vae_scale(vae) if vae is not None else 1.0
        fid_network, fid_reference = load_fid_tools(args, rank, device) if args.fid_every else (None, None)
    if len(dataset) < args.global_batch_size:
        raise ValueError(f"the dataset has {len(dataset)} images, fewer than one global batch of {args.global_batch_size}")
    try:
        model = DiT_models[args.model](input_size=latent_size, in_channels=channels, num_classes=args.num_classes,
                                       class_dropout_prob=args.class_dropout_prob,
                                       gradient_checkpointing=args.grad_checkpointing, block=args.block)
    except ValueError as error:
        raise ValueError(f"{error} (the model's input for --image-size {args.image_size})") from None
    init_notes = []
    if args.init_from is not None and checkpoint is None:  # reading the source draws nothing from the training stream
        with forked_rng(device):
            init_notes = rank_zero_decides(rank, lambda: load_init_weights(model, args.init_from))  # rank 0 downloads
            if rank != 0:
                load_init_weights(model, args.init_from)
    elif args.init_from is not None:
        init_notes = [f"--resume wins over --init-from: continuing {checkpoint_path}"]
    ema = deepcopy(model).to(device).requires_grad_(False)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    diffusion = create_diffusion(timestep_respacing="")

    # The experiment folder is claimed (created, or reused) only now that everything has been checked.
    experiment_dir, claim_notes = rank_zero_decides(rank, lambda: claim_experiment(args, checkpoint_path, scope))
    checkpoint_dir = experiment_dir / "checkpoints"
    if rank == 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        removed, freed = remove_stale_temporaries(checkpoint_dir, older_than=started)
    dist.barrier()
    logger = create_logger(experiment_dir, rank)
    scope.callback(close_logger, logger)
    logger.info(f"Experiment directory created at {experiment_dir}")
    for note in resume_notes + claim_notes + init_notes:
        logger.info(note)
    if rank == 0 and removed:
        logger.info(f"Removed {removed} temporary file(s) of an interrupted checkpoint write ({format_bytes(freed)})")
    logger.info(f"DiT Parameters: {sum(p.numel() for p in model.parameters()):,}")

    train_steps, epoch, position = 0, 0, 0
    if checkpoint is not None:
        load_weights(model, checkpoint["model"], f"--resume {checkpoint_path}")  # a mismatch names tensors and flags
        load_weights(ema, checkpoint["ema"], f"--resume {checkpoint_path}")
        opt.load_state_dict(checkpoint["opt"])
        scaler.load_state_dict(checkpoint["scaler"])
        train_steps, epoch, position = checkpoint["train_steps"], checkpoint["epoch"], checkpoint["position"]
        if len(checkpoint["rng"]) == world_size:
            set_rng_state(checkpoint["rng"][rank], device)
        else:
            logger.info(f"Checkpoint came from {len(checkpoint['rng'])} processes, not {world_size}: "
                        f"continuing with fresh per-rank seeds (the run will not repeat bit for bit)")
        logger.info(f"Resumed from {checkpoint_path} at step {train_steps} (epoch {epoch}, batch {position})")
        del checkpoint, loaded

    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if checkpoint_path is None:
        # Each rank initialised its own model from its own seed; DDP has just given them all rank
        # 0's weights. The EMA starts as a copy of those, as in the official script.
        update_ema(ema, model, decay=0)
    # Every random number of a step is drawn outside the model (label dropout too, below), so a
    # compiled model consumes the generators exactly as an eager one and resumes exactly.
    train_model = torch.compile(ddp_model) if args.compile else ddp_model
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.global_seed)
    # The loader gets a generator of its own: creating an epoch's iterator must not draw from the
    # global one, or a resumed run would drift from a straight one.
    loader = DataLoader(dataset, batch_size=local_batch, shuffle=False, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=args.num_workers > 0,
                        generator=torch.Generator().manual_seed(seed))
    steps_per_epoch = sampler.num_samples // local_batch
    micro = local_batch // args.grad_accum_steps
    micro_batches = [slice(k * micro, (k + 1) * micro) for k in range(args.grad_accum_steps)]
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    logger.info(f"Dataset contains {len(dataset):,} images ({args.data_path or args.feature_path}); "
                f"{steps_per_epoch} steps per epoch, {world_size} process(es) on {device}")

    def save_checkpoint() -> Path:
        """Collective: checks the ranks agree, gathers their RNG states; rank 0 writes atomically."""
        check_ranks_agree({"model": model, "EMA": ema}, train_steps)
        rngs = [None] * world_size
        dist.all_gather_object(rngs, rng_state(device))
        path = checkpoint_dir / f"{train_steps:07d}.pt"
        if rank == 0:
            atomic_torch_save({
                "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "scaler": scaler.state_dict(), "args": vars(args), "train_steps": train_steps,
                "epoch": epoch, "position": position, "rng": rngs,
            }, path)
            logger.info(f"Saved checkpoint to {path} (model and EMA identical on all {world_size} ranks)")
            if args.keep_last is not None:
                removed = prune_checkpoints(checkpoint_dir, args.keep_last, args.keep_every, keep=checkpoint_path)
                if removed:
                    logger.info(f"Deleted {', '.join(p.name for p in removed)} (--keep-last {args.keep_last})")
        dist.barrier()
        return path

    stop_signal = {"name": None}

    def request_stop(signum, frame):
        stop_signal["name"] = signal.Signals(signum).name

    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    sample_noise, sample_labels = fixed_sample_inputs(args, channels, latent_size, device)
    metrics_file = scope.enter_context(open(experiment_dir / "metrics.jsonl", "a")) if rank == 0 else None
    tracker = open_tracker(args.report_to, experiment_dir, args, train_steps if checkpoint_path else None) if rank == 0 else None
    if tracker is not None:
        scope.callback(tracker.close)
    max_steps = args.max_steps if args.max_steps is not None else args.epochs * steps_per_epoch
    progress = make_progress_bar(rank, train_steps, max_steps)
    model.train()
    ema.eval()
    running, start_time = RunningMetrics(diffusion.num_timesteps, device), time.time()
    first_bad_step, last_checkpoint = torch.tensor(NEVER, device=device), checkpoint_path

    def check_health() -> bool:
        """The only host sync between log lines: one all-reduce that tells every rank whether any
        rank saw a non-finite loss (an error) or a stop signal (the return value)."""
        stopping = torch.tensor(-float(stop_signal["name"] is not None), device=device)
        flags = torch.stack([first_bad_step.double(), stopping.double()])
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        bad_step, stop = flags.tolist()
        if bad_step != NEVER:
            kept = f"the last checkpoint, {last_checkpoint}, is intact" if last_checkpoint else "no checkpoint was written"
            raise FloatingPointError(f"loss became non-finite at step {int(bad_step)} (seen at step {train_steps}; "
                                     f"the weights are no longer finite and were not saved; {kept}). "
                                     f"Try a lower --lr or --grad-clip")
        return stop < 0

    done = train_steps >= max_steps
    while not done and epoch < args.epochs:
        sampler.set_epoch(epoch)
        sampler.skip = position * local_batch
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            # Flip per sample from the main process's generator, so the choice is saved and resumed.
            flip = torch.rand(x.shape[0], device=device) < (0.5 if args.random_flip else 0.0)
            if args.feature_path is not None:  # x holds (unflipped, flipped) x (mean, std)
                chosen = torch.where(flip[:, None, None, None, None], x[:, 1], x[:, 0])
                x = sample_latents(chosen[:, 0], chosen[:, 1], scale)
            else:
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
                if vae is not None:
                    x = sample_latents(*encode_posterior(vae, x), scale)
            for group in opt.param_groups:
                group["lr"] = learning_rate(args, train_steps, max_steps)
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
                    scaler.scale(part_loss).backward()
                loss += part_loss.detach()
                running.add_terms(t[part], terms)
            scaler.unscale_(opt)  # a no-op unless fp16's scaler is on: the norm and the clipping see true gradients
            if args.grad_clip is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            scaler.step(opt)
            scaler.update()
            update_ema(ema, model, args.ema_decay)

            # No host sync here: the loss is summed, and a non-finite one recorded, on the device.
            running.add_step(loss, grad_norm)
            first_bad_step = torch.where(torch.isfinite(loss.detach()) | (first_bad_step != NEVER),
                                         first_bad_step, train_steps + 1)
            train_steps += 1
            position += 1
            if progress is not None:
                progress.update(1)
            end_of_epoch = position == steps_per_epoch
            if end_of_epoch:
                epoch, position = epoch + 1, 0
            at_checkpoint = train_steps % args.ckpt_every == 0
            done = train_steps >= max_steps or (end_of_epoch and epoch >= args.epochs)
            if done or at_checkpoint or train_steps % args.log_every == 0 or train_steps % HEALTH_CHECK_EVERY == 0:
                done = check_health() or done
            if train_steps % args.log_every == 0:
                log_metrics(logger, metrics_file, tracker, device, running, start_time, train_steps, max_steps, args, opt)
                running, start_time = RunningMetrics(diffusion.num_timesteps, device), time.time()
            evaluated = time.time()
            if args.sample_every and train_steps % args.sample_every == 0 and rank == 0:
                grid = experiment_dir / "samples" / f"{train_steps:07d}.png"
                write_sample_grid(ema, vae, sample_noise, sample_labels, args, grid)
                if tracker is not None:
                    tracker.log_image("samples", grid, train_steps)
            if args.fid_every and train_steps % args.fid_every == 0:
                fid_features = ema_fid(ema, vae, fid_network, args, rank, world_size, channels, latent_size,
                                       local_batch, device)
                if rank == 0:
                    record = {"step": train_steps, "fid": frechet_distance(statistics(fid_features), fid_reference),
                              "fid_samples": args.fid_samples, "fid_sampler": args.fid_sampler, "fid_steps": args.fid_steps,
                              "fid_cfg_scale": args.fid_cfg_scale, "fid_seconds": time.time() - evaluated}
                    logger.info(f"(step={train_steps:07d}) FID-{args.fid_samples}: {record['fid']:.4f} (EMA weights, "
                                f"{args.fid_sampler} {args.fid_steps} steps, cfg-scale {args.fid_cfg_scale}, "
                                f"{record['fid_seconds']:.1f} s)")
                    write_record(metrics_file, record, tracker)
            start_time += time.time() - evaluated  # throughput counts training only
            if at_checkpoint or done:
                last_checkpoint = save_checkpoint()
            if done or end_of_epoch:
                break

    if stop_signal["name"]:
        logger.info(f"Stopped by {stop_signal['name']} at step {train_steps}; resume with --resume auto")
    for signum, handler in previous_handlers.items():
        signal.signal(signum, handler)
    if progress is not None:
        progress.close()
    model.eval()
    logger.info("Done!")


def prune_checkpoints(folder: Path, keep_last: int, keep_every: Optional[int], keep: Optional[Path]) -> list:
    """Delete all but the newest keep_last checkpoints, those of every keep_every-th step and `keep`
    (the one the run resumed from). Called only after a newer checkpoint is completely written."""
    checkpoints = sorted(folder.glob("*.pt"))  # zero-padded step numbers sort by step
    kept = set(checkpoints[-keep_last:])
    kept |= {c for c in checkpoints if keep_every and c.stem.isdigit() and int(c.stem) % keep_every == 0}
    removed = [c for c in checkpoints if c not in kept and (keep is None or c.resolve() != Path(keep).resolve())]
    for checkpoint in removed:
        checkpoint.unlink()
    return removed


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


class RunningMetrics:
    """What a log line reports, summed on the device between log lines (no host sync): the loss,
    the gradient norm, and each loss term by timestep quartile (IDDPM's loss_q0..loss_q3)."""

    TERMS = ("loss", "mse", "vb")

    def __init__(self, num_timesteps: int, device: torch.device):
        self.num_timesteps = num_timesteps
        self.steps = 0
        self.step_sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, finite grad norms, their count
        self.quartile_sums = torch.zeros(len(self.TERMS) + 1, 4, dtype=torch.float64, device=device)  # last row: counts

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


def log_metrics(logger, metrics_file, tracker, device, running: RunningMetrics, start_time, train_steps, max_steps,
                args, opt) -> None:
    """The official log line (loss averaged over ranks and steps, steps/s), with throughput, peak
    memory and the training time left at this speed; metrics.jsonl and the tracker also get the
    learning rate, gradient norm and the loss terms by timestep quartile."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    steps_per_sec = running.steps / (time.time() - start_time)
    reduced = running.reduce()
    record = {"step": train_steps, "loss": reduced.pop("loss"), "steps_per_sec": steps_per_sec,
              "images_per_sec": steps_per_sec * args.global_batch_size, "peak_memory_mb": peak_memory_mb(device),
              "lr": opt.param_groups[0]["lr"], **reduced}
    left = timedelta(seconds=round(max(max_steps - train_steps, 0) / steps_per_sec))
    logger.info(f"(step={train_steps:07d}) Train Loss: {record['loss']:.4f}, Train Steps/Sec: {steps_per_sec:.2f}, "
                f"Images/Sec: {record['images_per_sec']:.1f}, Peak Memory: {record['peak_memory_mb']:.0f} MB, "
                f"Time Left: {left}")
    write_record(metrics_file, record, tracker)


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


def make_progress_bar(rank: int, initial: int, total: int):
    """A tqdm bar on rank 0 when stderr is a terminal; None otherwise (logs stay clean)."""
    if rank != 0 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(initial=initial, total=total, unit="step", dynamic_ncols=True)


def fixed_sample_inputs(args, channels: int, latent_size: int, device: torch.device):
    """The same noise and labels for every grid of a run, from a private generator."""
    generator = torch.Generator().manual_seed(args.global_seed)
    count = args.sample_grid_size
    noise = torch.randn(count, channels, latent_size, latent_size, generator=generator).to(device)
    labels = (torch.arange(count) % args.num_classes).to(device)
    return noise, labels


@torch.no_grad()
def write_sample_grid(ema, vae, noise, labels, args, path: Path) -> None:
    """Sample the EMA model with CFG and save a PNG grid; the training RNG is left untouched."""
    diffusion = sampling_diffusion("ddpm", args.sample_steps, "--sample-steps")
    with forked_rng(noise.device):
        torch.manual_seed(args.global_seed)
        x, model_fn, model_kwargs = guided_batch(noise, labels, args.num_classes, args.sample_cfg_scale, ema)
        latents = run_sampler(diffusion, "ddpm", model_fn, x, model_kwargs, pixels=vae is None)
    save_image_grid(decode(vae, latents[: len(noise)]), path, nrow=int(math.ceil(math.sqrt(len(noise)))))


def load_fid_tools(args, rank: int, device: torch.device) -> tuple[InceptionNetwork, dict]:
    """The FID network (rank 0 downloads it first, if it must) and the reference statistics."""
    reference = check_statistics(read_npz(Path(args.fid_ref)), args.fid_ref) if Path(args.fid_ref).is_file() else None
    if reference is None:
        raise ValueError(f"--fid-ref {args.fid_ref}: no such file (write one with evaluate.py DATA --save-stats)")
    if rank != 0:
        dist.barrier()
    network = InceptionNetwork(args.inception, device)
    if rank == 0:
        dist.barrier()
    return network, reference


@torch.no_grad()
def ema_fid(ema, vae, network: InceptionNetwork, args, rank: int, world_size: int, channels: int, latent_size: int,
            batch_size: int, device: torch.device) -> Optional[np.ndarray]:
    """Pool3 features of --fid-samples EMA samples, sampled in shares across the ranks and gathered
    on rank 0 (None elsewhere)."""
    local = rank_fid_features(ema, vae, network, args, rank, world_size, channels, latent_size, batch_size, device)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, local)
    return np.concatenate(gathered) if rank == 0 else None


@torch.no_grad()
def rank_fid_features(ema, vae, network: InceptionNetwork, args, rank: int, world_size: int, channels: int,
                      latent_size: int, batch_size: int, device: torch.device) -> np.ndarray:
    """One rank's share of the FID samples (--fid-sampler), as pool3 features. Each rank's noise and labels
    are the same at every evaluation, so successive FIDs differ only by the weights; the training
    RNG is untouched."""
    diffusion = sampling_diffusion(args.fid_sampler, args.fid_steps, "--fid-steps")
    generator = torch.Generator().manual_seed(args.global_seed * world_size + rank)
    count = len(range(rank, args.fid_samples, world_size))
    features = []
    with forked_rng(device):
        torch.manual_seed(args.global_seed * world_size + rank)
        for start in range(0, count, batch_size):
            n = min(batch_size, count - start)
            noise = torch.randn(n, channels, latent_size, latent_size, generator=generator).to(device)
            labels = torch.randint(0, args.num_classes, (n,), generator=generator).to(device)
            x, model_fn, model_kwargs = guided_batch(noise, labels, args.num_classes, args.fid_cfg_scale, ema)
            latents = run_sampler(diffusion, args.fid_sampler, model_fn, x, model_kwargs, pixels=vae is None)[:n]
            images = to_uint8_images(decode(vae, latents))
            features.append(network(as_uint8_nchw(images, "the FID samples"))[0].numpy())
    return np.concatenate(features) if features else np.zeros((0, 2048), np.float32)


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
    official.add_argument("--vae", type=str, default="ema", help="ema | mse | none (pixel space) | local AutoencoderKL folder")
    official.add_argument("--num-workers", type=int, default=4)
    official.add_argument("--log-every", type=int, default=100)
    official.add_argument("--ckpt-every", type=int, default=50_000)

    extra = parser.add_argument_group("additions")
    extra.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    extra.add_argument("--block", choices=BLOCK_DESIGNS, default="adaln-zero",
                       help="conditioning design of the paper's Section 3 (adaln-zero: the official DiT)")
    extra.add_argument("--no-tf32", dest="tf32", action="store_false", help="disable TF32 matmuls on Ampere+ GPUs")
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
    extra.add_argument("--fid-ref", type=str, default=None, help="reference statistics (evaluate.py --save-stats, or ADM's)")
    extra.add_argument("--fid-samples", type=int, default=5000, help="samples per FID, split over the ranks")
    extra.add_argument("--fid-sampler", choices=SAMPLERS, default="ddim", help="sampler for those samples")
    extra.add_argument("--fid-steps", type=int, default=50, help="sampling steps for those samples")
    extra.add_argument("--fid-cfg-scale", type=float, default=1.0, help="guidance for them (1: none, as the paper's curves)")
    extra.add_argument("--inception", type=str, default=None, help="local FID network weights (default: download)")
    extra.add_argument("--report-to", choices=REPORT_TO, default="none",
                       help="also send metrics and sample grids to TensorBoard or W&B (optional installs)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args())
