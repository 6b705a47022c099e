"""Train a DiT with DDP:

    torchrun --nproc_per_node=N train.py --model DiT-XL/2 --data-path /imagenet/train

Does what the official script does (same flags and defaults), and adds: CPU/gloo runs and plain
`python train.py`, any image size, pixel-space or local VAEs, pre-extracted latents, exact resume,
mixed precision, gradient checkpointing, torch.compile, warm-up, clipping, sample grids, metrics,
fine-tuning, gradient accumulation, learning-rate decay, TensorBoard and W&B.

train() reads as the official main(): set-up, then the loop under the same section comments. Its
pieces live in ditlib: training (the step), datasets, runs (checkpoints), monitoring (reports).
"""
import argparse
import math
import random
import time
from contextlib import ExitStack, nullcontext
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from ditlib.command_line import add_device_flags, add_transport_flags, settings_from
from ditlib.datasets import DataSource, load_data
from ditlib.errors import flag_names, one_line_errors, require_non_negative, require_positive
from ditlib.files import check_output_folder
from ditlib.latents import vae_identity
from ditlib.monitoring import (
    HEALTH_CHECK_EVERY,
    FidMonitor,
    Health,
    Monitor,
    Monitoring,
    open_outputs,
    progress_bar,
    stop_requests,
)
from ditlib.processes import distributed, forked_rng
from ditlib.runs import KeepPolicy, ResumePolicy, choose_checkpoint, restore, save_checkpoint
from ditlib.samplers import FLOW_SAMPLERS, SAMPLERS, check_guidance
from ditlib.trackers import REPORT_TO, require_tracker
from ditlib.training import (
    LearningRate,
    Objective,
    ResumableSampler,
    TrainState,
    class_dropout,
    initialise,
    per_process_batch,
    to_latents,
    update_ema,
)
from ditlib.weights import MODELS, ModelSource, model_transport
from models import BLOCK_DESIGNS


def main(args: argparse.Namespace) -> None:
    check_args(args)
    check_output_folder(args.results_dir, "--results-dir")
    with distributed(args.device) as (rank, world_size, device), ExitStack() as scope:
        train(args, rank, world_size, device, scope)


def train(args: argparse.Namespace, rank: int, world_size: int, device: torch.device,
          scope: ExitStack) -> None:
    """The run. What must last until it ends (lock, files, signal handlers, progress bar) is entered
    into scope, so every exit, an exception included, releases it."""
    local_batch = per_process_batch(args.global_batch_size, args.grad_accum_steps, world_size)
    started = time.time()
    torch.backends.cuda.matmul.allow_tf32 = args.tf32  # TF32 on by default, as the official script
    torch.backends.cudnn.allow_tf32 = args.tf32
    seed = args.global_seed * world_size + rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    monitoring = settings_from(Monitoring, vars(args))
    rate = settings_from(LearningRate, vars(args))
    objective = Objective(transport_of(args))  # DiT's diffusion, or a SiT's transport

    # A local VAE is recorded by content: a run must not resume into one retrained in place.
    if args.feature_path is None and Path(args.vae).is_dir():
        args.vae_sha256 = vae_identity(args.vae).get("vae_sha256")  # None: a hub name
    # What to resume: decided first, so a damaged checkpoint or a changed flag is reported at once.
    resumed_from, checkpoint, notes = choose_checkpoint(settings_from(ResumePolicy, vars(args)),
                                                        vars(args), rank)
    # Data, VAE and FID tools: built under a forked generator, so the DiT's initialisation is the
    # official one (the official script builds it straight after seeding) whatever else is loaded.
    with forked_rng(device):
        data = load_data(settings_from(DataSource, vars(args)), args.sample_every > 0, rank,
                         world_size, device)
        if data is None:
            return  # --check-data only checks
        args.vae = data.vae_name  # with latents, the VAE that made them: recorded, used by grids
        fid = FidMonitor(monitoring, objective, rank, device) if args.fid_every else None

    # Create model:
    try:
        model = MODELS[args.model](
            input_size=data.latent_size, in_channels=data.channels, num_classes=args.num_classes,
            class_dropout_prob=args.class_dropout_prob, block=args.block,
            gradient_checkpointing=args.grad_checkpointing)
    except ValueError as error:
        raise ValueError(f"{error} (the model's input for --image-size {args.image_size})") \
            from None
    notes += initialise(model, args.init_from, resumed_from, rank, device)
    ema = deepcopy(model).to(device).requires_grad_(False)  # the EMA, for use after training
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    state = TrainState(model, ema, opt, scaler)

    # Setup an experiment folder, claimed only now that everything has been checked:
    resumed_step = checkpoint["train_steps"] if checkpoint else None
    out = open_outputs(vars(args), rank, resumed_from, resumed_step, started, scope)
    logger = out.logger
    for note in notes + out.notes:
        logger.info(note)
    logger.info(f"{args.model[:3]} Parameters: {sum(p.numel() for p in model.parameters()):,}")
    if checkpoint is not None:
        for note in restore(state, checkpoint, rank, world_size, device):
            logger.info(note)
        logger.info(f"Resumed from {resumed_from} at step {state.train_steps} "
                    f"(epoch {state.epoch}, batch {state.batches_into_epoch})")
    del checkpoint
    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if resumed_from is None:  # every rank holds rank 0's weights now (DDP broadcast them)
        update_ema(ema, model, decay=0)
    # Every random number of a step is drawn outside the model: compiled, it draws as eager.
    train_model = torch.compile(ddp_model) if args.compile else ddp_model

    # Setup data:
    sampler = ResumableSampler(data.dataset, num_replicas=world_size, rank=rank, shuffle=True,
                               seed=args.global_seed)
    # Its own generator: creating an epoch's iterator must not draw from the training stream.
    loader = DataLoader(data.dataset, batch_size=local_batch, shuffle=False, sampler=sampler,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda",
                        drop_last=True, persistent_workers=args.num_workers > 0,
                        generator=torch.Generator().manual_seed(seed))
    steps_per_epoch = sampler.num_samples // local_batch
    max_steps = args.max_steps if args.max_steps is not None else args.epochs * steps_per_epoch
    state.schedule_steps, schedule_notes = rate.schedule_length(state.schedule_steps, max_steps)
    for note in schedule_notes:
        logger.info(note)
    micro = local_batch // args.grad_accum_steps
    micro_batches = [slice(k * micro, (k + 1) * micro) for k in range(args.grad_accum_steps)]
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    keep = KeepPolicy(args.keep_last, args.keep_every, resumed_from)
    logger.info(f"Dataset contains {len(data.dataset):,} images "
                f"({args.data_path or args.feature_path}); "
                f"{steps_per_epoch} steps per epoch, {world_size} process(es) on {device}")

    # Prepare models for training:
    model.train()  # important! This enables embedding dropout for classifier-free guidance
    ema.eval()  # EMA model should always be in eval mode
    stop = scope.enter_context(stop_requests())
    progress = scope.enter_context(progress_bar(rank, state.train_steps, max_steps))
    monitor = Monitor(monitoring, out, data, objective, device, fid)
    health = Health(device, resumed_from)

    logger.info(f"Training for {args.epochs} epochs...")
    done = state.train_steps >= max_steps
    while not done and state.epoch < args.epochs:
        sampler.set_epoch(state.epoch)
        sampler.skip_samples = state.batches_into_epoch * local_batch
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            x = to_latents(x, data, args.random_flip)  # flips (drawn here: they resume), VAE draw
            for group in opt.param_groups:
                group["lr"] = rate.at(state.train_steps, state.schedule_steps)
            # The batch's random numbers, drawn once in the order a whole-batch step draws them
            # (times and noise as the objective's code, then the label dropout), split over
            # micro-batches.
            t, noise = objective.draw(x)
            drop = class_dropout(x.shape[0], args.class_dropout_prob, device)
            opt.zero_grad(set_to_none=True)
            loss = torch.zeros((), device=device)
            for index, part in enumerate(micro_batches):
                labels = dict(y=y[part]) if drop is None else \
                    dict(y=y[part], force_drop_ids=drop[part])
                # DDP all-reduces the gradients once, after the last micro-batch's backward.
                with ddp_model.no_sync() if index < len(micro_batches) - 1 else nullcontext():
                    with torch.autocast(device.type, dtype=autocast_dtype,
                                        enabled=autocast_dtype is not None):
                        terms = objective.losses(train_model, x[part], t[part], labels,
                                                 noise[part])
                        part_loss = terms["loss"].mean() / len(micro_batches)
                    scaler.scale(part_loss).backward()
                loss += part_loss.detach()
                monitor.running.add_terms(t[part], terms)
            scaler.unscale_(opt)  # a no-op unless fp16's scaler is on: clipping sees true gradients
            parameters = [p for p in model.parameters() if p.grad is not None]
            if args.grad_clip is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(parameters, args.grad_clip)
            else:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
            scaler.step(opt)
            scaler.update()
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
            monitor.log(state, max_steps)

            # Save DiT checkpoint (before grids and FID, which can take minutes or fail):
            if at_checkpoint or done:
                health.last_checkpoint = save_checkpoint(state, vars(args), out.checkpoint_dir,
                                                         rank, world_size, device, keep, logger)
            if monitor.evaluate(state, rank, world_size, local_batch, stop):  # FID cut short
                if not (at_checkpoint or done):
                    health.last_checkpoint = save_checkpoint(state, vars(args), out.checkpoint_dir,
                                                             rank, world_size, device, keep, logger)
                done = True
            if done or end_of_epoch:
                break

    if stop["name"]:
        logger.info(f"Stopped by {stop['name']} at step {state.train_steps}; "
                    f"resume with --resume auto")
    model.eval()  # important! This disables randomized embedding dropout
    logger.info("Done!")


def transport_of(args: argparse.Namespace):
    """A SiT's transport from its flags (SiT's defaults where unset); None for a DiT, which refuses
    them by name."""
    return model_transport(settings_from(ModelSource, vars(args)), {"model": args.model}, {})


def check_args(args: argparse.Namespace) -> None:
    """Every flag's range, checked before any work starts; the sampling flags of grids and FID with
    the rules of the sampling commands."""
    if args.model not in MODELS:
        raise ValueError(f"--model {args.model!r} is unknown; choose from {', '.join(MODELS)}")
    transport = transport_of(args)
    if transport is not None:  # recorded resolved, so a checkpoint names its objective in full
        for setting in ("path_type", "prediction", "loss_weight", "train_eps", "sample_eps"):
            setattr(args, setting, getattr(transport, setting))
    args.fid_sampler = args.fid_sampler or ("ode" if transport is not None else "ddim")
    objective = Objective(transport)
    if args.image_size <= 0 or (args.vae != "none" and args.image_size % 8):
        raise ValueError(f"--image-size {args.image_size} must be a positive multiple of 8 "
                         f"with a VAE")
    if args.num_classes < 1:
        raise ValueError(f"--num-classes must be at least 1, got {args.num_classes}")
    if args.feature_path is None and args.data_path is None:
        raise ValueError("--data-path is required (or --feature-path with latents from "
                         "extract_features.py)")
    require_positive(**{name: getattr(args, name) for name in (
        "global_batch_size", "grad_accum_steps", "epochs", "log_every", "ckpt_every", "max_steps",
        "keep_last", "keep_every", "sample_steps", "sample_grid_size", "fid_samples", "fid_steps")})
    require_non_negative(num_workers=args.num_workers)
    for flag in ("sample_every", "fid_every", "warmup_steps"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0 (0: never), got "
                             f"{getattr(args, flag)}")
    # AdamW's first step divides the rate by 1 - beta1 = 0.1 in float32: no larger one fits.
    require_in_range(args, "lr", 0, float(torch.finfo(torch.float32).max) * 0.1,
                     "AdamW's first step divides it by 0.1 in float32", high_open=True)
    require_in_range(args, "weight_decay", 0, math.inf)
    require_in_range(args, "class_dropout_prob", 0, 1, "1 would drop every label", high_open=True)
    require_in_range(args, "ema_decay", 0, 1, high_open=True)
    if args.grad_clip is not None and not (math.isfinite(args.grad_clip) and args.grad_clip > 0):
        raise ValueError(f"--grad-clip must be a positive gradient norm, got {args.grad_clip} (a "
                         f"negative one reverses the gradient, 0 stops learning)")
    if args.fid_ref is not None and not args.fid_every:
        raise ValueError("--fid-ref only applies with --fid-every K (without it no FID is "
                         "measured)")
    if args.keep_every is not None and args.keep_last is None:
        raise ValueError("--keep-every only applies with --keep-last (without it every checkpoint "
                         "is kept)")
    if args.lr_schedule != "constant" and not 0 <= args.lr_min <= args.lr:
        raise ValueError(f"--lr-min must lie in [0, --lr {args.lr}], got {args.lr_min}")
    with flag_names(num_sampling_steps="--sample-steps", cfg_scale="--sample-cfg-scale"):
        check_guidance(args.sample_cfg_scale, None, objective.sampler(None, args.sample_steps), 1.0)
    with flag_names(num_sampling_steps="--fid-steps", cfg_scale="--fid-cfg-scale",
                    sampler="--fid-sampler"):
        check_guidance(args.fid_cfg_scale, None,
                       objective.sampler(args.fid_sampler, args.fid_steps), 1.0)
    if args.fid_every:
        if args.fid_ref is None:
            raise ValueError("--fid-every needs --fid-ref STATS.npz (write one with evaluate.py "
                             "DATA --save-stats STATS.npz)")
        if not Path(args.fid_ref).is_file():
            raise ValueError(f"--fid-ref {args.fid_ref}: no such file (write one with evaluate.py "
                             f"DATA --save-stats)")
        if args.fid_samples < 2:
            raise ValueError("--fid-samples must be at least 2 for a covariance, got "
                             f"{args.fid_samples}")
    require_tracker(args.report_to)


def require_in_range(args: argparse.Namespace, flag: str, low: float, high: float, why: str = "",
                     high_open: bool = False) -> None:
    """A float flag that must be a number in [low, high] (or [low, high))."""
    value = getattr(args, flag)
    below_high = value < high if high_open else value <= high
    inside = math.isfinite(value) and low <= value and below_high
    if not inside:
        bracket = ")" if high_open else "]"
        raise ValueError(f"--{flag.replace('_', '-')} must lie in [{low:g}, {high:g}{bracket}, "
                         f"got {value}" + (f" ({why})" if why else ""))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a DiT (DDP; torchrun or plain python).")
    official = parser.add_argument_group("official flags (same names and defaults)")
    official.add_argument("--data-path", type=str, default=None,
                          help="ImageFolder root: one sub-folder per class")
    official.add_argument("--results-dir", type=str, default="results")
    official.add_argument("--model", type=str, choices=list(MODELS), default="DiT-XL/2",
                          help="a DiT (the DDPM objective) or a SiT (SiT's transport)")
    official.add_argument("--image-size", type=int, default=256,
                          help="pixels; any multiple of 8 with a VAE")
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
                       help="conditioning design of the paper's Section 3 (adaln-zero: the "
                            "official DiT)")
    extra.add_argument("--feature-path", type=str, default=None,
                       help="latents written by extract_features.py")
    extra.add_argument("--resume", type=str, default=None,
                       help="checkpoint path, or 'auto' for the latest one")
    extra.add_argument("--init-from", type=str, default=None,
                       help="start from these weights (an official name, a checkpoint, a state "
                            "dict, .safetensors or a diffusers folder); a label or position "
                            "table of another size is re-initialised")
    extra.add_argument("--allow-changed-args", action="store_true",
                       help="resume although flags other than run length, logging and "
                            "monitoring changed")
    extra.add_argument("--check-data", action="store_true",
                       help="decode every image of --data-path, report, and exit")
    extra.add_argument("--max-steps", type=int, default=None,
                       help="stop after this many steps in total")
    extra.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="no")
    extra.add_argument("--grad-checkpointing", action="store_true")
    extra.add_argument("--grad-accum-steps", type=int, default=1,
                       help="split each process's batch into K micro-batches, one optimizer "
                            "step for all")
    extra.add_argument("--compile", action="store_true", help="torch.compile the model")
    extra.add_argument("--grad-clip", type=float, default=None, help="max gradient norm")
    extra.add_argument("--lr", type=float, default=1e-4)
    extra.add_argument("--weight-decay", type=float, default=0.0)
    extra.add_argument("--ema-decay", type=float, default=0.9999)
    extra.add_argument("--warmup-steps", type=int, default=0)
    extra.add_argument("--lr-schedule", choices=["constant", "cosine", "linear"],
                       default="constant",
                       help="after warm-up: constant (official), or decay to --lr-min at the "
                            "last step")
    extra.add_argument("--lr-min", type=float, default=0.0,
                       help="the learning rate a decay ends at")
    extra.add_argument("--keep-last", type=int, default=None,
                       help="keep only the newest N checkpoints (older ones are deleted once a "
                            "newer one is written)")
    extra.add_argument("--keep-every", type=int, default=None,
                       help="with --keep-last, also keep every M-th step's")
    extra.add_argument("--class-dropout-prob", type=float, default=0.1)
    extra.add_argument("--no-random-flip", dest="random_flip", action="store_false",
                       help="no horizontal flips (for data where mirroring changes meaning, "
                            "like digits)")
    extra.add_argument("--sample-every", type=int, default=0,
                       help="write an EMA sample grid every K steps (0: never)")
    extra.add_argument("--sample-steps", type=int, default=50,
                       help="sampling steps for those grids")
    extra.add_argument("--sample-cfg-scale", type=float, default=4.0)
    extra.add_argument("--sample-grid-size", type=int, default=16)
    extra.add_argument("--fid-every", type=int, default=0,
                       help="FID of EMA samples every K steps (0: never)")
    extra.add_argument("--fid-ref", type=str, default=None,
                       help="reference statistics (evaluate.py --save-stats, or ADM's), or "
                            "images (.npz arr_0)")
    extra.add_argument("--fid-samples", type=int, default=5000,
                       help="samples per FID, split over the ranks")
    extra.add_argument("--fid-sampler", choices=SAMPLERS + FLOW_SAMPLERS, default=None,
                       help="sampler for those samples (default: ddim; a SiT's: ode)")
    extra.add_argument("--fid-steps", type=int, default=50,
                       help="sampling steps for those samples")
    extra.add_argument("--fid-cfg-scale", type=float, default=1.0,
                       help="guidance for them (1: none, as the paper's curves)")
    extra.add_argument("--inception", type=str, default=None,
                       help="local FID network weights (default: download)")
    extra.add_argument("--report-to", choices=REPORT_TO, default="none",
                       help="also send metrics and sample grids to TensorBoard or W&B (optional "
                            "installs)")
    add_transport_flags(parser.add_argument_group("SiT's transport (SiT's flags and defaults)"),
                        "default")
    add_device_flags(parser, tf32_help="TF32 matmuls and convolutions on Ampere+ GPUs (on by "
                                       "default, as in the official script)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    with one_line_errors():
        main(parse_args())
