"""Sample many images in parallel for FID: PNGs, then one .npz that ADM's evaluation suite reads.

    torchrun --nproc_per_node=N sample_ddp.py --model DiT-XL/2 --num-fid-samples 50000

As the official script: per-rank seeds, image i*world + rank + total, oversampling to a multiple of
the global batch, `arr_0` (N, H, W, 3) uint8. Also: CPU/gloo, the labels as `arr_1`, DDIM, and
resumption: a rerun skips batches whose PNGs are all there and readable, advancing the generator
exactly as sampling them would, so the result is byte-identical to an uninterrupted run. The folder's
meta.json records everything that determines its images; a rerun with other settings is refused
(naming what differs) unless --overwrite, so one .npz never mixes images of two runs.
"""
import argparse
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from files import atomic_write, format_bytes, remove_stale_temporaries
from images import to_uint8_images
from latents import decode
from processes import distributed, rank_zero_decides, require_positive, run_cli
from sampling import add_sampling_flags, check_sampling_flags, guided_batch, run_sampler, sampling_diffusion
from weights import load_model_for_sampling

SAMPLES_META = "meta.json"
# Raise when a change to the sampling code changes the images that the same settings give, so
# folders sampled before the change are not topped up with images sampled after it.
SAMPLER_VERSION = 1


def readable_png(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except Exception:
        return False


def save_png_atomically(array: np.ndarray, path: Path) -> None:
    with atomic_write(path) as handle:
        Image.fromarray(array).save(handle, format="PNG")


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def sample_settings(args: argparse.Namespace, config: dict, world_size: int, device: torch.device) -> dict:
    """Everything that decides which image lands under which index (--num-fid-samples only decides
    how many): the weights by content, the model, the sampler and its options, the random streams
    (seed, world size, batch, device), TF32, and the versions of the code."""
    vae = config["vae"] if config["vae"] in ("ema", "mse", "none") else str(Path(config["vae"]).resolve())
    return {
        "checkpoint_sha256": file_digest(args.ckpt) if args.ckpt else None,
        "pretrained": None if args.ckpt else f"DiT-XL-2-{config['image_size']}x{config['image_size']}.pt",
        "weights": args.weights, "model": config["model"], "block": config["block"],
        "image_size": config["image_size"], "num_classes": config["num_classes"], "vae": vae,
        "sampler": args.sampler, "num_sampling_steps": args.num_sampling_steps,
        "eta": args.eta if args.sampler == "ddim" else None, "cfg_scale": args.cfg_scale,
        "cfg_interval": args.cfg_interval,
        "global_seed": args.global_seed, "world_size": world_size, "per_proc_batch_size": args.per_proc_batch_size,
        "device": device.type, "tf32": args.tf32 if device.type == "cuda" else None,
        "sampler_version": SAMPLER_VERSION, "torch": torch.__version__,
    }


def prepare_sample_folder(folder: Path, settings: dict, overwrite: bool, started: float) -> None:
    """Make `folder` ready for images of `settings` (rank 0): refuse images made with other
    settings (or with unknown ones), or delete them with --overwrite; record the settings before
    the first PNG; remove temporary files left by a killed run."""
    meta_path = folder / SAMPLES_META
    npz_path = folder.with_name(folder.name + ".npz")
    if overwrite:
        for path in [*folder.glob("*.png"), meta_path, npz_path]:
            path.unlink(missing_ok=True)
    elif meta_path.is_file():
        saved = json.loads(meta_path.read_text())
        differences = [f"{key} {saved.get(key)!r} there, {value!r} now" for key, value in settings.items()
                       if saved.get(key) != value]
        if differences:
            raise ValueError(f"{folder} holds images sampled with other settings ({'; '.join(differences)}); "
                             f"rerun with --overwrite to delete them and start again, or choose another --sample-dir")
    elif any(folder.glob("*.png")):
        raise ValueError(f"{folder} holds PNGs but no {SAMPLES_META} saying how they were made (an earlier version or "
                         f"another script wrote them); rerun with --overwrite to delete them, or choose another --sample-dir")
    folder.mkdir(parents=True, exist_ok=True)
    if not meta_path.is_file():
        with atomic_write(meta_path) as handle:
            handle.write(json.dumps(settings, indent=1).encode())
    count, freed = (a + b for a, b in zip(remove_stale_temporaries(folder, started),
                                           remove_stale_temporaries(folder.parent, started)))
    if count:
        print(f"Removed {count} temporary file(s) of an interrupted run ({format_bytes(freed)})")


def skip_batch(diffusion, args, x: torch.Tensor, model_kwargs: dict, out_channels: int) -> None:
    """Draw exactly what sampling this batch would draw, without the network: a stand-in model of
    zeros keeps every randn_like of the loop, in the same order and shapes (the ODE solvers draw
    nothing, and the guidance interval changes no draw)."""
    def zeros(x_t, t, **kwargs):
        return torch.zeros(x_t.shape[0], out_channels, *x_t.shape[2:], device=x_t.device)

    run_sampler(diffusion, args.sampler, zeros, x, model_kwargs, eta=args.eta)  # clipping draws nothing


def create_npz_from_sample_folder(sample_dir: Path, num: int, labels: np.ndarray) -> Path:
    """Stack {0..num-1}.png into arr_0 (N, H, W, 3) uint8 and the labels into arr_1; write atomically."""
    missing = [i for i in range(num) if not (sample_dir / f"{i:06d}.png").is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} of {num} PNGs are missing from {sample_dir} (first: {missing[0]:06d}.png)")
    samples = np.stack([np.asarray(Image.open(sample_dir / f"{i:06d}.png")) for i in tqdm(range(num), desc="npz")])
    if samples.shape[0] != num or samples.ndim != 4 or samples.shape[3] != 3 or samples.dtype != np.uint8:
        raise RuntimeError(f"expected {num} RGB uint8 images, got an array of {samples.shape} {samples.dtype}")
    npz_path = sample_dir.with_name(sample_dir.name + ".npz")
    with atomic_write(npz_path, expected_bytes=samples.nbytes + 8 * num) as handle:
        np.savez(handle, arr_0=samples, arr_1=labels[:num])
    print(f"Saved .npz file to {npz_path} [arr_0 shape={samples.shape}, arr_1 shape={labels[:num].shape}]")
    return npz_path


def main(args: argparse.Namespace) -> None:
    check_sampling_flags(args, min_cfg_scale=1.0)  # the official script asserts cfg-scale >= 1
    require_positive(args, "per_proc_batch_size", "num_fid_samples")
    with distributed(args.device) as (rank, world_size, device):
        sample(args, rank, world_size, device)


@torch.no_grad()
def sample(args: argparse.Namespace, rank: int, world_size: int, device: torch.device) -> None:
    # As the official script: --tf32 sets the matmul flag only; cuDNN keeps PyTorch's default (TF32 on).
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    started = time.time()
    diffusion = sampling_diffusion(args.sampler, args.num_sampling_steps)  # draws nothing; refuses bad counts early
    seed = args.global_seed * world_size + rank
    torch.manual_seed(seed)

    model, vae, config = load_model_for_sampling(args, device, default_vae="ema")
    channels, latent_size = model.in_channels, model.input_size

    model_string_name = config["model"].replace("/", "-")
    ckpt_string_name = Path(args.ckpt).stem if args.ckpt else "pretrained"
    vae_name = Path(config["vae"]).name if config["vae"] not in ("ema", "mse", "none") else config["vae"]
    # The official name, then what our additions change (the other settings are told apart by meta.json).
    folder_name = (f"{model_string_name}-{ckpt_string_name}-size-{config['image_size']}-vae-{vae_name}-"
                   f"cfg-{args.cfg_scale}-seed-{args.global_seed}" + ("" if args.sampler == "ddpm" else f"-{args.sampler}")
                   + (f"-interval-{args.cfg_interval[0]}-{args.cfg_interval[1]}" if args.cfg_interval else ""))
    sample_folder_dir = Path(args.sample_dir) / folder_name
    settings = sample_settings(args, config, world_size, device) if rank == 0 else None
    rank_zero_decides(rank, lambda: prepare_sample_folder(sample_folder_dir, settings, args.overwrite, started))
    if rank == 0:
        print(f"Saving .png samples at {sample_folder_dir}")

    n = args.per_proc_batch_size
    global_batch_size = n * world_size
    total_samples = int(math.ceil(args.num_fid_samples / global_batch_size) * global_batch_size)
    if rank == 0:
        print(f"Total number of images that will be sampled: {total_samples}")
    iterations = total_samples // world_size // n
    out_channels = model.out_channels
    labels_by_index = {}
    skipped = 0
    total = 0
    for _ in tqdm(range(iterations), disable=rank != 0):
        noise = torch.randn(n, channels, latent_size, latent_size, device=device)
        labels = torch.randint(0, config["num_classes"], (n,), device=device)
        indices = [i * world_size + rank + total for i in range(n)]
        paths = [sample_folder_dir / f"{index:06d}.png" for index in indices]
        x, model_fn, model_kwargs = guided_batch(noise, labels, config["num_classes"], args.cfg_scale, model,
                                                 interval=args.cfg_interval)
        if all(readable_png(path) for path in paths):
            skip_batch(diffusion, args, x, model_kwargs, out_channels)
            skipped += n
        else:
            latents = run_sampler(diffusion, args.sampler, model_fn, x, model_kwargs, eta=args.eta, pixels=vae is None)[:n]
            for array, path in zip(to_uint8_images(decode(vae, latents)), paths):
                save_png_atomically(array, path)
        labels_by_index.update(zip(indices, labels.tolist()))
        total += global_batch_size

    gathered = [None] * world_size
    dist.all_gather_object(gathered, labels_by_index)
    skipped_counts = [None] * world_size
    dist.all_gather_object(skipped_counts, skipped)
    if rank == 0:
        if sum(skipped_counts):
            print(f"Kept {sum(skipped_counts)} existing samples, drew {total_samples - sum(skipped_counts)} new ones")
        merged = {index: label for part in gathered for index, label in part.items()}
        labels_array = np.array([merged[i] for i in range(total_samples)], dtype=np.int64)
        create_npz_from_sample_folder(sample_folder_dir, args.num_fid_samples, labels_array)
        print("Done.")
    dist.barrier()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Sample a folder of PNGs and an FID .npz with DDP.")
    official = parser.add_argument_group("official flags (defaults as the official script; model flags "
                                         "fall back to a train.py checkpoint's own args)")
    official.add_argument("--model", type=str, default=None, help="default DiT-XL/2")
    official.add_argument("--vae", type=str, default=None, help="ema (default) | mse | none | local AutoencoderKL folder")
    official.add_argument("--sample-dir", type=str, default="samples")
    official.add_argument("--per-proc-batch-size", type=int, default=32)
    official.add_argument("--num-fid-samples", type=int, default=50_000)
    official.add_argument("--image-size", type=int, default=None, help="default 256")
    official.add_argument("--num-classes", type=int, default=None, help="default 1000")
    official.add_argument("--cfg-scale", type=float, default=1.5)
    official.add_argument("--num-sampling-steps", type=int, default=250)
    official.add_argument("--global-seed", type=int, default=0)
    official.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                          help="TF32 matmuls on Ampere+ GPUs (faster, barely changes FID); cuDNN's own flag is left alone")
    official.add_argument("--ckpt", type=str, default=None, help="a train.py checkpoint, a state dict or .safetensors")
    extra = parser.add_argument_group("additions")
    add_sampling_flags(extra)
    extra.add_argument("--overwrite", action="store_true",
                       help="delete the folder's images, meta.json and .npz first, and start again")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args())
