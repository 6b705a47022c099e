"""A training run's experiment folder and its checkpoints: which checkpoint to resume and whether the
new flags allow it, claiming and locking the folder, writing, restoring and pruning checkpoints,
and the generator states a checkpoint keeps so a resumed run repeats the same random numbers."""
import errno
import fcntl
import random
from contextlib import ExitStack
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ditlib.checkpoints import DamagedCheckpoint, read_checkpoint
from ditlib.errors import SettingError
from ditlib.files import atomic_torch_save
from ditlib.processes import rank_zero_decides
from ditlib.training import TrainState
from ditlib.weights import load_weights

# Flags a resumed run may change (each change is logged): how long it runs, and how often and how
# it logs, saves, samples and evaluates. The FIXED ones define the model and its inputs; any other
# change needs --allow-changed-args. The ones in NOT_COMPARED say where and how to resume.
FREE_TO_CHANGE = {"max_steps", "epochs", "log_every", "ckpt_every", "keep_last", "keep_every", "num_workers",
                  "sample_every", "sample_steps", "sample_cfg_scale", "sample_grid_size", "fid_every", "fid_ref",
                  "fid_samples", "fid_sampler", "fid_steps", "fid_cfg_scale", "inception", "report_to"}
FIXED = ("model", "block", "image_size", "num_classes", "vae", "vae_sha256", "feature_path", "init_from", "path_type",
         "prediction", "loss_weight", "train_eps", "sample_eps")
NOT_COMPARED = {"resume", "results_dir", "allow_changed_args", "check_data"}


@dataclass(frozen=True)
class ResumePolicy:
    """What to resume (a checkpoint path, "auto" for the newest run of the model in results_dir, or
    None for a new run) and whether flags that change the run may differ from its saved ones."""
    resume: Optional[str]
    results_dir: str
    allow_changed_args: bool = False


def changed_args(saved: dict, current: dict) -> tuple[list, list, list]:
    """(fixed, free, other) flags whose value differs from the saved run's, as '--flag old -> new'.
    Flags the checkpoint does not record (an older version) are not compared; with --feature-path
    the latents decide the VAE."""
    ignored = NOT_COMPARED | ({"vae"} if current.get("feature_path") is not None else set())
    fixed, free, other = [], [], []
    for key in sorted(saved.keys() & current.keys() - ignored):
        if saved[key] != current[key]:
            change = f"--{key.replace('_', '-')} {saved[key]} -> {current[key]}"
            if key == "vae_sha256":  # a local VAE folder's files, not a flag
                change = f"the files of --vae {current['vae']} (SHA-256 {saved[key]} -> {current[key]})"
            (fixed if key in FIXED else free if key in FREE_TO_CHANGE else other).append(change)
    return fixed, free, other


def resume_point(policy: ResumePolicy, flags: dict) -> tuple[Optional[Path], Optional[dict], list]:
    """(checkpoint path, its contents, lines for the log) to resume, or (None, None, []) to start
    afresh. 'auto' takes the newest experiment of flags["model"] that has checkpoints and its newest
    readable checkpoint: an unreadable one is moved aside as NAME.corrupt and the one before it is
    tried. The saved flags are compared with these (changed_args). Runs on rank 0 only."""
    if policy.resume is None:
        return None, None, []
    notes, model = [], flags["model"]
    if policy.resume == "auto":
        suffix = "-" + model.replace("/", "-")
        folders = [f for f in sorted(Path(policy.results_dir).glob(f"*{suffix}"), reverse=True)
                   if any((f / "checkpoints").glob("*.pt"))]
        if not folders:
            return None, None, [f"--resume auto: no checkpoint of {model} in {policy.results_dir}; starting afresh"]
        path = checkpoint = None
        for candidate in sorted((folders[0] / "checkpoints").glob("*.pt"), reverse=True):
            try:
                checkpoint, path = read_checkpoint(candidate), candidate
                break
            except DamagedCheckpoint as error:  # truncated, overwritten, not a checkpoint at all (an I/O error
                # or a refused global is raised as it is: the file may be fine, so it is never moved)
                aside = candidate.with_name(candidate.name + ".corrupt")
                candidate.rename(aside)
                notes.append(f"{error}; moved it aside to {aside.name}, trying the checkpoint before it")
        if path is None:
            raise SettingError("resume", f"auto: no checkpoint in {folders[0] / 'checkpoints'} can be read "
                                         f"({'; '.join(notes)})")
    else:
        path = Path(policy.resume)
        if not path.is_file():
            raise SettingError("resume", f"{policy.resume}: no such checkpoint file")
        checkpoint = read_checkpoint(path)  # a damaged or foreign file is a ValueError naming it
    check_resumable(checkpoint, path)
    fixed, free, other = changed_args(checkpoint["args"], flags)
    if fixed:
        raise SettingError("resume", f"{path}: the run was started with other values of flags that define the model, "
                                     f"its data or its start ({'; '.join(fixed)}); start a new run for these (another "
                                     f"--results-dir, or without --resume)")
    if other and not policy.allow_changed_args:
        raise SettingError("resume", f"{path}: flags differ from the run's ({'; '.join(other)}); pass the run's "
                                     f"values, or --allow-changed-args to continue it with the new ones")
    if free or other:
        notes.append(f"Continuing with changed flags: {'; '.join(free + other)}")
    return path, checkpoint, notes


def check_resumable(checkpoint, path: Path) -> None:
    """Only a checkpoint of this train.py holds what an exact resume needs."""
    if not isinstance(checkpoint, dict) or "train_steps" not in checkpoint or "rng" not in checkpoint:
        official = isinstance(checkpoint, dict) and "opt" in checkpoint
        kind = "an official train.py checkpoint" if official else "not a checkpoint of this train.py"
        raise SettingError("resume", f"{path}: {kind}; it holds no step counter or RNG state, so it cannot "
                                     f"be resumed exactly (sample from it with sample.py --ckpt, or start a new run)")


def claim_experiment(results_dir: str, model: str, resumed: Optional[Path], scope: ExitStack) -> tuple[Path, list]:
    """(the folder this run writes into, lines for the log), locked until the run ends (rank 0).
    A resumed run continues its checkpoint's experiment; a new one reuses the newest folder of its
    model if that run died before its first checkpoint, else takes the next number. Resuming from a
    checkpoint that has later ones beside it branches: a new folder, so the later checkpoints and
    the records of that run are left as they are."""
    notes = []
    if resumed is not None and resumed.parent.name == "checkpoints":
        folder = resumed.parent.parent
        later = [p.name for p in resumed.parent.glob("*.pt") if step_of(p) > step_of(resumed)]
        if not later:
            if not lock_experiment(folder, scope):
                raise SettingError("resume", f": {folder} is in use by another run that is still alive (it holds "
                                             f"{folder / '.lock'}); stop that run first")
            return folder, []
        notes.append(f"Branching from {resumed}: its run went on to {max(later)}, which is left as it is; this "
                     f"run writes a new folder in {results_dir}")
    root = Path(results_dir)
    root.mkdir(parents=True, exist_ok=True)
    suffix = "-" + model.replace("/", "-")
    newest = max(root.glob(f"*{suffix}"), default=None)
    if newest is not None and not any(not p.name.startswith(".") for p in (newest / "checkpoints").glob("*")) \
            and lock_experiment(newest, scope):
        return newest, [*notes, f"Reusing {newest}: the run that made it stopped before writing a checkpoint"]
    # The official numbering; a taken number (a folder was deleted, or a run starting beside this one
    # took it) moves on to the next.
    index = len(glob(f"{root}/*"))
    while True:
        folder = root / f"{index:03d}{suffix}"
        index += 1
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        if lock_experiment(folder, scope):
            return folder, notes


def step_of(checkpoint: Path) -> int:
    """The step in a checkpoint's name (train.py writes 0001800.pt); -1 for a file named otherwise."""
    return int(checkpoint.stem) if checkpoint.stem.isdigit() else -1


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


@dataclass(frozen=True)
class KeepPolicy:
    """Which checkpoints a run keeps: the newest keep_last (all when None), every keep_every-th
    step's, and the one it resumed from."""
    keep_last: Optional[int] = None
    keep_every: Optional[int] = None
    resumed_from: Optional[Path] = None


def prune_checkpoints(folder: Path, keep_last: int, keep_every: Optional[int], keep: Optional[Path]) -> list:
    """Delete all but the newest keep_last checkpoints, those of every keep_every-th step and `keep`
    (the one the run resumed from). Called only after a newer checkpoint is completely written."""
    checkpoints = sorted(folder.glob("*.pt"))  # zero-padded step numbers sort by step
    kept = set(checkpoints[-keep_last:])
    kept |= {c for c in checkpoints if keep_every and step_of(c) > 0 and step_of(c) % keep_every == 0}
    removed = [c for c in checkpoints if c not in kept and (keep is None or c.resolve() != Path(keep).resolve())]
    for checkpoint in removed:
        checkpoint.unlink()
    return removed


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


def choose_checkpoint(policy: ResumePolicy, flags: dict, rank: int) -> tuple[Optional[Path], Optional[dict], list]:
    """(path, contents, lines for the log) of the checkpoint to resume, decided on rank 0 and read
    by every rank; (None, None, notes) to start afresh."""
    decided = {}

    def decide():
        path, decided["checkpoint"], notes = resume_point(policy, flags)
        return path, notes

    path, notes = rank_zero_decides(rank, decide)
    if path is None:
        return None, None, notes
    return path, decided["checkpoint"] if rank == 0 else read_checkpoint(path), notes


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


def save_checkpoint(state: TrainState, flags: dict, folder: Path, rank: int, world_size: int, device: torch.device,
                    keep: KeepPolicy, logger) -> Path:
    """Collective: checks the ranks agree, gathers their RNG states; rank 0 writes the TrainState and
    the run's flags atomically, then prunes by `keep`."""
    check_ranks_agree({"model": state.model, "EMA": state.ema}, state.train_steps)
    rngs = [None] * world_size
    dist.all_gather_object(rngs, rng_state(device))
    path = folder / f"{state.train_steps:07d}.pt"
    if rank == 0:
        atomic_torch_save({
            "model": state.model.state_dict(), "ema": state.ema.state_dict(), "opt": state.opt.state_dict(),
            "scaler": state.scaler.state_dict(), "args": flags, "train_steps": state.train_steps,
            "epoch": state.epoch, "position": state.batches_into_epoch, "schedule_steps": state.schedule_steps,
            "rng": rngs,
        }, path)
        logger.info(f"Saved checkpoint to {path} (model and EMA identical on all {world_size} ranks)")
        if keep.keep_last is not None:
            removed = prune_checkpoints(folder, keep.keep_last, keep.keep_every, keep=keep.resumed_from)
            if removed:
                logger.info(f"Deleted {', '.join(p.name for p in removed)} (--keep-last {keep.keep_last})")
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
