"""train.py end to end: images/s with the VAE encoding every batch vs pre-extracted latents.

    python bench/train_e2e.py [--model DiT-S/2] [--image-size 128] [--images 256] [--steps 40] [--smoke]

Everything train.py does per step is in the figure: PNG decoding and cropping (one process, no
workers: this machine has 2 cores), flips, the VAE encoder (on the fly) or reading the stored
posterior (pre-extracted), the DiT step, EMA. The VAE is a local diffusers AutoencoderKL with the
SD VAE's layout at half its width (random weights: the cost is the same); the one-off
extract_features.py time is listed too. Throughput is the median (min-max) of train.py's own log
records after the first.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.harness import ROOT, machine, markdown
from models import DiT_models, count_forward_gmacs


def write_images(root: Path, count: int, size: int) -> Path:
    """count random RGB PNGs in 4 class folders, a little larger than size so the crop has work."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class_{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size + 16, size + 24, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    return root


def write_vae(path: Path, widths: tuple):
    """A random AutoencoderKL with the SD VAE's layout and these block widths, saved to path."""
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(widths),
                        up_block_types=("UpDecoderBlock2D",) * len(widths), block_out_channels=widths,
                        layers_per_block=2, latent_channels=4, norm_num_groups=32)
    vae.save_pretrained(path)
    return vae


def encoder_gmacs(vae, image_size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        vae.encode(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops() / 2 / 1e9


def run(command: list) -> float:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def throughput(results: Path) -> list[float]:
    """images/s of every log record but the first (which includes start-up)."""
    metrics = next(results.rglob("metrics.jsonl"))
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [r["images_per_sec"] for r in records if "images_per_sec" in r][1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    args = parser.parse_args()
    widths = (64, 128, 256, 256)
    if args.smoke:
        args.model, args.image_size, args.images, args.batch_size, args.steps, args.log_every = \
            "DiT-Nano/2", 32, 16, 4, 6, 2
        widths = (32, 32, 32, 32)

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data = write_images(scratch / "images", args.images, args.image_size)
        vae = write_vae(scratch / "vae", widths)
        vae_gmacs = encoder_gmacs(vae, args.image_size)
        with torch.device("meta"):
            dit_gmacs = count_forward_gmacs(DiT_models[args.model](input_size=args.image_size // 8))
        common = ["--model", args.model, "--image-size", args.image_size, "--num-classes", 4, "--num-workers", 0,
                  "--device", "cpu", "--global-batch-size", args.batch_size, "--max-steps", args.steps,
                  "--log-every", args.log_every, "--ckpt-every", 10 ** 9]
        extract_seconds = run(["extract_features.py", "--data-path", data, "--features-path", scratch / "features",
                               "--image-size", args.image_size, "--vae", scratch / "vae", "--device", "cpu",
                               "--num-workers", 0])
        run(["train.py", "--data-path", data, "--vae", scratch / "vae", "--results-dir", scratch / "on-the-fly",
             *common])
        run(["train.py", "--feature-path", scratch / "features", "--results-dir", scratch / "latents", *common])
        on_the_fly, latents = throughput(scratch / "on-the-fly"), throughput(scratch / "latents")

    def cell(values: list[float]) -> str:
        return f"{np.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"

    print(f"train.py end to end: {args.model} at {args.image_size}px ({args.image_size // 8}x{args.image_size // 8} "
          f"latents), batch {args.batch_size}, {args.steps} steps, one process; VAE encoder {vae_gmacs:.1f} "
          f"GMACs/image (both image and mirror are encoded once by extract_features.py), DiT forward "
          f"{dit_gmacs:.2f} GMACs/image; {machine(torch.device('cpu'))}\n")
    print(markdown(["input", "images/s", "vs on-the-fly VAE"], [
        ["images + VAE encoder every step", cell(on_the_fly), "1.00x"],
        ["pre-extracted latents (--feature-path)", cell(latents), f"{np.median(latents) / np.median(on_the_fly):.2f}x"],
    ]))
    print(f"\nOne-off extraction of {args.images} images (and their mirrors): {extract_seconds:.1f} s "
          f"including start-up.")


if __name__ == "__main__":
    main()
