"""Encode a dataset with the VAE once, so training never runs the VAE again.

    torchrun --nproc_per_node=N extract_features.py --data-path /imagenet/train \
        --features-path features/in256
    torchrun --nproc_per_node=N train.py --feature-path features/in256 ...

Each image is stored as its VAE posterior (mean and std) for the image and its mirror, so train.py
keeps the official random flips and a fresh latent draw every step, exactly as on-the-fly encoding.
ImageNet at 256px takes 1.28M x 2 x 2 x 4 x 32 x 32 float32 = 84 GB; --dtype float16 or bfloat16
halves that to 42 GB (train.py reads the files memory-mapped and casts each item up to float32).
"""
import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset

from ditlib.errors import one_line_errors, require_non_negative, require_positive
from ditlib.files import atomic_write_text, check_output_folder
from ditlib.images import image_folder
from ditlib.latents import (
    FEATURES_META,
    STORED_DTYPES,
    encode_posterior,
    feature_shard_names,
    latent_shape,
    load_vae,
    to_stored,
    vae_identity,
    vae_scale,
)
from ditlib.processes import create_logger, distributed


def main(args: argparse.Namespace) -> None:
    if args.vae == "none":
        raise ValueError("--vae none has no latents to extract; train pixel-space models with "
                         "--data-path")
    if args.image_size <= 0 or args.image_size % 8:
        raise ValueError(f"--image-size {args.image_size} must be a positive multiple of 8")
    require_positive(batch_size=args.batch_size)
    require_non_negative(num_workers=args.num_workers)
    if (Path(args.features_path) / FEATURES_META).is_file() and not args.overwrite:
        raise ValueError(f"--features-path {args.features_path} holds a finished extraction; "
                         f"choose another folder, or pass --overwrite to replace it (until the new "
                         f"one finishes, neither is usable)")
    check_output_folder(args.features_path, "--features-path")
    with distributed(args.device) as (rank, world_size, device):
        extract(args, rank, world_size, device)


def extract(args: argparse.Namespace, rank: int, world_size: int, device: torch.device) -> None:
    dataset = image_folder(args.data_path, args.image_size)
    vae = load_vae(args.vae, device)
    channels, latent_size = latent_shape(vae, args.image_size)
    out = Path(args.features_path)
    identity = vae_identity(args.vae) if rank == 0 else None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        # --overwrite: the folder is incomplete until meta.json returns
        (out / FEATURES_META).unlink(missing_ok=True)
    dist.barrier()
    logger = create_logger(None, rank)

    # Every rank takes indices rank, rank + world, ...: no padding, no image twice.
    indices = list(range(rank, len(dataset), world_size))
    loader = DataLoader(Subset(dataset, indices), batch_size=args.batch_size, shuffle=False,
                        num_workers=args.num_workers)
    posterior_name, label_name = feature_shard_names(rank)
    tmp_posteriors = out / f".{posterior_name}.tmp.npy"
    shape = (len(indices), 2, 2, channels, latent_size, latent_size)
    posteriors = np.lib.format.open_memmap(tmp_posteriors, mode="w+",
                                           dtype=STORED_DTYPES[args.dtype], shape=shape)
    labels = np.zeros(len(indices), dtype=np.int64)
    done = 0
    for x, y in loader:
        x = x.to(device)
        for flipped, images in enumerate((x, x.flip(3))):
            mean, std = encode_posterior(vae, images)
            posteriors[done: done + len(x), flipped, 0] = to_stored(mean, args.dtype)
            posteriors[done: done + len(x), flipped, 1] = to_stored(std, args.dtype)
        labels[done: done + len(x)] = y.numpy()
        done += len(x)
        logger.info(f"rank 0: {done}/{len(indices)} images encoded")
    posteriors.flush()
    del posteriors
    os.replace(tmp_posteriors, out / posterior_name)
    tmp_labels = out / f".{label_name}.tmp.npy"
    np.save(tmp_labels, labels)
    os.replace(tmp_labels, out / label_name)

    counts = [None] * world_size
    dist.all_gather_object(counts, len(indices))
    if rank == 0:
        names = [feature_shard_names(r) for r in range(world_size)]
        meta = {
            "image_size": args.image_size, **identity, "scale": vae_scale(vae),
            "channels": channels, "latent_size": latent_size,
            "num_classes": len(dataset.classes), "classes": dataset.classes,
            "dtype": args.dtype,
            "num_images": len(dataset),
            "shards": [{"posteriors": posteriors, "labels": labels, "count": count}
                       for (posteriors, labels), count in zip(names, counts)],
        }
        atomic_write_text(out / FEATURES_META, json.dumps(meta, indent=1))
        logger.info(f"Wrote {len(dataset)} images' latents ({world_size} shard(s)) to {out}")
    dist.barrier()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Pre-extract VAE latents of an ImageFolder for train.py --feature-path.")
    parser.add_argument("--data-path", type=str, default=None,
                        help="ImageFolder root: one sub-folder per class")
    parser.add_argument("--features-path", type=str, default="features", help="output folder")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--vae", type=str, default="ema",
                        help="ema | mse | local AutoencoderKL folder")
    parser.add_argument("--batch-size", type=int, default=32, help="images per process per step")
    parser.add_argument("--dtype", choices=list(STORED_DTYPES), default="float32",
                        help="how the posteriors are stored (float16/bfloat16: half the disk)")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a finished extraction in --features-path")
    return parser.parse_args(argv)


if __name__ == "__main__":
    with one_line_errors():
        main(parse_args())
