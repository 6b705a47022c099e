"""Processes: devices, the DDP world, generators, logging."""
import ctypes
import logging
import os
import re
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar, Union

import torch
import torch.distributed as dist

from ditlib.errors import SettingError

T = TypeVar("T")
# What a command prints when it refuses (one_line_errors, argparse): "train.py: error: ...".
ONE_LINE_ERROR = re.compile(r"^\S+\.py: error: ")


def resolve_device(choice: str) -> torch.device:
    """'auto' takes CUDA when present; 'cuda' without a GPU is an error, not a silent fallback."""
    if choice not in ("auto", "cuda", "cpu"):
        raise SettingError("device", f"must be auto, cuda or cpu, got {choice!r}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise SettingError("device", "cuda was asked for, but PyTorch sees no CUDA device")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


@contextmanager
def distributed(device_choice: str) -> Iterator[tuple[int, int, torch.device]]:
    """Join the torchrun world (NCCL on CUDA, gloo on CPU), or make a world of one for plain python,
    for the body of a with-block; the process group is torn down however the body ends.

    Yields (rank, world_size, device); the device uses LOCAL_RANK, so multi-node runs work.
    """
    device = resolve_device(device_choice)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.get_rank(), dist.get_world_size(), device
    finally:
        dist.destroy_process_group()


def rank_zero_decides(rank: int, decide: Callable[[], T]) -> T:
    """decide() run on rank 0, its (picklable) result given to every rank; a ValueError, OSError or
    MemoryError it raises is raised on every rank, so none is left waiting in a collective for a rank
    that stopped."""
    outcome = [None, None]
    if rank == 0:
        try:
            outcome = [decide(), None]
        except (ValueError, OSError, MemoryError) as error:
            outcome = [None, error]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def rank_zero_first(rank: int, make: Callable[[], T]) -> T:
    """make() on rank 0 first, then on the other ranks (what rank 0 downloads, the others find)."""
    if rank != 0:
        dist.barrier()
    made = make()
    if rank == 0:
        dist.barrier()
    return made


def keep_memory_flat() -> None:
    """glibc raises its mmap threshold as large blocks are freed, after which batch-sized buffers come
    from the heap and their pages are kept: the peak creeps up batch after batch (measured: +426 MB
    from 24 to 240 images of 512px in evaluate.py). A fixed threshold (glibc's initial 128 KiB) hands
    every large block back when it is freed. A no-op where the C library is not glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def forked_rng(device: torch.device):
    """A context in which the global CPU generator (and the device's, on CUDA) can be drawn from
    without the draws showing outside it: for building or running anything besides the trained DiT."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def create_logger(logging_dir: Optional[Union[str, Path]], rank: int) -> logging.Logger:
    """Rank 0 logs to the terminal and to logging_dir/log.txt; other ranks stay silent. The files of
    an earlier logger of this process are closed (close_logger)."""
    logger = logging.getLogger("DiT")
    close_logger(logger)
    logger.propagate = False
    if rank == 0:
        formatter = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        handlers = [logging.StreamHandler()]
        if logging_dir is not None:
            handlers.append(logging.FileHandler(Path(logging_dir) / "log.txt"))
        for handler in handlers:
            handler.setFormatter(formatter)
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    else:
        logger.addHandler(logging.NullHandler())
        logger.setLevel(logging.CRITICAL)
    return logger


def close_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


def run_child(command: list, cwd: Optional[Union[str, Path]] = None, env: Optional[dict] = None) -> None:
    """Run a project command as a child process, its output shown as it comes. If it fails, one
    ChildProcessError (an OSError, so a command prints it as one line) names the command, its exit
    status and the child's own one-line error ("script.py: error: ..."; else the last line it wrote
    to stderr: torchrun follows its ranks' errors with a report of its own)."""
    import subprocess

    last = error = ""
    with subprocess.Popen([str(part) for part in command], cwd=cwd, env=env, stderr=subprocess.PIPE,
                          text=True, errors="replace") as child:
        for line in child.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            last = line.strip().split("\r")[-1].strip() or last
            error = last if ONE_LINE_ERROR.match(last) else error
    if child.returncode:
        name = next((Path(part).name for part in command if str(part).endswith(".py")), str(command[0]))
        raise ChildProcessError(f"{name} exited with status {child.returncode}: {error or last or 'no message'} "
                                f"(command: {' '.join(map(str, command))})")
