"""Seconds per image of class-conditional sampling, the way sample.py does it, on this machine.

    python bench/sample_speed.py [--model DiT-S/2] [--images 8] [--steps 250] [--cfg-scale 4.0] [--device cpu]

A 256px-equivalent latent (4 x 32 x 32) through ancestral sampling with classifier-free guidance
(so each step runs the network on 2 x images); random weights cost what trained ones do. The VAE
decode is not included (the SD VAE cannot be fetched offline).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import guided_batch, resolve_device, run_sampler, sampling_diffusion  # noqa: E402
from models import DiT_models  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--images", type=int, default=8, help="sample.py's default: the 8 official labels")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = DiT_models[args.model](input_size=32).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)  # zero-initialised layers would let some kernels skip work
    noise = torch.randn(args.images, 4, 32, 32, device=device)
    labels = torch.arange(args.images, device=device) % 1000
    x, model_fn, model_kwargs = guided_batch(noise, labels, 1000, args.cfg_scale, model)
    with torch.no_grad():
        run_sampler(sampling_diffusion(args.sampler, 2), args.sampler, model_fn, x, model_kwargs)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run_sampler(sampling_diffusion(args.sampler, args.steps), args.sampler, model_fn, x, model_kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start

    print(f"| model | device | images | network batch | steps | cfg | total s | s/step | s/image |")
    print(f"|---|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.model} | {device.type} ({torch.get_num_threads()} threads) | {args.images} | {x.shape[0]} | "
          f"{args.steps} | {args.cfg_scale} | {seconds:.1f} | {seconds / args.steps:.3f} | {seconds / args.images:.2f} |")


if __name__ == "__main__":
    main()
