"""What the bench scripts share: timing with medians, memory probes, the machine, Markdown tables.

Every figure is the median of repeated runs, printed with the min and max; every script compares
against plain eager fp32 measured in the same run, because absolute numbers drift between machines.
"""
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> dict:
    """Seconds per call of fn: median, min and max over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "runs": repeats}


def spread(result: dict, scale: float = 1.0, digits: int = 3) -> str:
    """'median (min-max)' of a timed() result, each multiplied by scale."""
    low, high = result['min'] * scale, result['max'] * scale
    return f"{result['median'] * scale:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def rate(result: dict, work: float, digits: int = 1) -> str:
    """work per second as 'median (min-max)': the min time gives the max rate."""
    return f"{work / result['median']:.{digits}f} ({work / result['max']:.{digits}f}-{work / result['min']:.{digits}f})"


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator counter, or the kernel's high-water mark of this process."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak resident set)


def peak_memory_mb(device: torch.device) -> float:
    """Peak since reset_peak_memory: max_memory_allocated on CUDA, peak RSS (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return process_status_mb("VmHWM")


def current_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    return process_status_mb("VmRSS")


def process_status_mb(field: str) -> float:
    """A memory field of /proc/self/status (Linux), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status: CPU memory figures need Linux")


def machine(device: torch.device) -> str:
    """One line naming what the figures were measured on."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or "cpu"
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.exists():
            models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("model name")]
            name = models[0] if models else name
    return (f"{name}, {torch.get_num_threads()} threads, {os.cpu_count()} cores visible, "
            f"torch {torch.__version__}")


def markdown(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """A Markdown table; the first `left` columns are text, the rest right-aligned numbers."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < left else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def random_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero weights everywhere: zero-initialised layers would let some kernels skip work."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return model
