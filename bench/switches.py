"""Each speed/memory switch of train.py against plain eager fp32, on one training step.

    python bench/switches.py [--model DiT-S/2] [--batch-size 8] [--repeats 3]
                             [--memory-model DiT-B/2] [--memory-batch-size 32] [--smoke]

Switches: the SDPA math backend (instead of PyTorch's fused kernel), --compile (inductor),
bf16 and fp16 autocast (--mixed-precision), gradient checkpointing (--grad-checkpointing). Each
runs in a fresh process, twice: once for time, once for memory. Memory is the peak above the
resting footprint (weights, optimizer state) during a step: max_memory_allocated on CUDA; on CPU
the peak resident set, with glibc told to return every block of 128 KiB or more to the kernel on
free (MALLOC_MMAP_THRESHOLD_), so the resident set follows the live tensors. The second table is
gradient checkpointing's effect on that memory for a larger model and batch.
"""
import argparse
import json
import os
import subprocess
import sys
from contextlib import nullcontext

import torch

from bench.harness import ROOT, current_memory_mb, machine, markdown, peak_memory_mb, reset_peak_memory, spread, timed
from bench.model_speed import build, training_step

SWITCHES = ["eager fp32", "sdpa math", "compile", "bf16 autocast", "fp16 autocast", "grad checkpointing"]


def worker(args: argparse.Namespace) -> dict:
    """One switch in this process: {'time': timed() result or None, 'memory_mb': ..., 'resting_mb': ...}."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = torch.device(args.device)
    model, _ = build(args.model, args.input_size, device)
    switch = args.worker
    if switch == "grad checkpointing":
        model.enable_gradient_checkpointing()
    if switch == "compile":
        model = torch.compile(model)
    autocast = {"bf16 autocast": torch.bfloat16, "fp16 autocast": torch.float16}.get(switch)
    step = training_step(model.train(), args.batch_size, device, autocast)
    context = sdpa_kernel(SDPBackend.MATH) if switch == "sdpa math" else nullcontext()
    with context:
        step()  # warm-up: compiles, allocates the optimizer state
        if args.mode == "memory":
            resting = current_memory_mb(device)
            reset_peak_memory(device)
            step()
            return {"memory_mb": peak_memory_mb(device) - resting, "resting_mb": resting}
        return {"time": timed(step, device, args.repeats, warmup=0)}


def run_worker(args: argparse.Namespace, switch: str, mode: str, model: str, batch_size: int) -> dict:
    env = {**os.environ}
    if mode == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    # CPUs have no fp16 matmul kernels (a step is ~25x slower): one timed step says enough there.
    repeats = 1 if switch == "fp16 autocast" and args.device == "cpu" else args.repeats
    command = [sys.executable, "-m", "bench.switches", "--worker", switch, "--mode", mode, "--model", model,
               "--batch-size", str(batch_size), "--repeats", str(repeats), "--device", args.device,
               "--input-size", str(args.input_size)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{switch} ({mode}) failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-model", default="DiT-B/2")
    parser.add_argument("--memory-batch-size", type=int, default=32)
    parser.add_argument("--input-size", type=int, default=32, help="latent side (32: 256px images)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, one repeat: checks the script runs")
    parser.add_argument("--worker", choices=SWITCHES, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["time", "memory"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.smoke:
        args.model, args.memory_model, args.batch_size, args.memory_batch_size = "DiT-Nano/4", "DiT-Nano/4", 2, 2
        args.repeats, args.input_size = 1, 8

    results = {}
    for switch in SWITCHES:
        results[switch] = {**run_worker(args, switch, "time", args.model, args.batch_size),
                           **run_worker(args, switch, "memory", args.model, args.batch_size)}
        print(f"[switches] {switch}: {results[switch]}", file=sys.stderr, flush=True)
    base = results["eager fp32"]
    rows = [[switch, spread(r["time"]), f"{base['time']['median'] / r['time']['median']:.2f}x",
             f"{r['memory_mb']:.0f}", f"{r['memory_mb'] / base['memory_mb']:.2f}x"] for switch, r in results.items()]
    memory_unit = "max_memory_allocated" if args.device == "cuda" else "peak RSS"
    print(f"Training step of {args.model}, batch {args.batch_size}, {8 * args.input_size}px-equivalent latents; "
          f"time median (min-max) of {args.repeats} in seconds (fp16 on CPU: 1); memory: {memory_unit} above rest, MB; "
          f"{machine(torch.device(args.device))}\n")
    print(markdown(["switch", "step seconds", "speed vs eager fp32", "step memory MB", "memory vs eager fp32"], rows))

    plain = run_worker(args, "eager fp32", "memory", args.memory_model, args.memory_batch_size)
    checkpointed = run_worker(args, "grad checkpointing", "memory", args.memory_model, args.memory_batch_size)
    print(f"\nGradient checkpointing, {args.memory_model} at batch {args.memory_batch_size} "
          f"(resting footprint {plain['resting_mb']:.0f} MB):\n")
    print(markdown(["run", "step memory MB", "vs plain"], [
        ["plain", f"{plain['memory_mb']:.0f}", "1.00x"],
        ["grad checkpointing", f"{checkpointed['memory_mb']:.0f}",
         f"{checkpointed['memory_mb'] / plain['memory_mb']:.2f}x "
         f"({1 - checkpointed['memory_mb'] / plain['memory_mb']:.0%} less)"],
    ]))


if __name__ == "__main__":
    main()
