"""Sample many images in parallel for FID: PNGs, then one .npz that ADM's evaluation suite reads.

    torchrun --nproc_per_node=N sample_ddp.py --model DiT-XL/2 --num-fid-samples 50000

As the official script: per-rank seeds, image i*world + rank + total, oversampling to a multiple of
the global batch, `arr_0` (N, H, W, 3) uint8. Also: CPU/gloo, the labels as `arr_1`, DDIM, and
resumption: a rerun skips batches whose PNGs are all there and readable, advancing the generator
exactly as sampling them would, so the result is byte-identical to an uninterrupted run. The
folder's meta.json records everything that determines its images; a rerun with other settings is
refused (naming what differs) unless --overwrite, so one .npz never mixes images of two runs.
"""
import argparse
import json
import math
import time
from pathlib import Path

import diffusers
import numpy as np
import timm
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from ditlib.command_line import add_device_flags, add_model_flags, add_sampler_flags, settings_from
from ditlib.errors import one_line_errors, require_positive
from ditlib.files import (
    atomic_write,
    check_output_folder,
    file_digest,
    format_bytes,
    remove_stale_temporaries,
)
from ditlib.images import readable_png, save_png, to_uint8_images
from ditlib.latents import decode, vae_identity
from ditlib.pretrained import PRETRAINED_MODELS
from ditlib.processes import distributed, rank_zero_decides
from ditlib.samplers import NoNetwork, SamplingSettings, generate
from ditlib.weights import ModelConfig, ModelSource, load_model_for_sampling

SAMPLES_META = "meta.json"
# Raise when a change to the sampling code changes the images that the same settings give, so
# folders sampled before the change are not topped up with images sampled after it.
SAMPLER_VERSION = 1


def sample_settings(args: argparse.Namespace, config: ModelConfig, sampler, world_size: int,
                    device: torch.device) -> dict:
    """Everything that decides which image lands under which index (--num-fid-samples only decides
    how many): the weights and a local VAE by content, the model, the sampler and its options, the
    random streams (seed, world size, batch, device), TF32, and the versions of the code."""
    local = args.ckpt is not None and not official_name(args.ckpt)
    return {
        "checkpoint_sha256": file_digest(args.ckpt) if local else None,
        "pretrained": None if local else
        f"{config.model.replace('/', '-')}-{config.image_size}x{config.image_size}.pt",
        "weights": args.weights, "model": config.model, "block": config.block,
        "image_size": config.image_size, "num_classes": config.num_classes,
        **vae_identity(config.vae),  # a local VAE folder by its path and its files' SHA-256
        "sampler": sampler.name, "num_sampling_steps": args.num_sampling_steps,
        "eta": args.eta if sampler.name == "ddim" else None, "cfg_scale": args.cfg_scale,
        "cfg_interval": list(settings_from(SamplingSettings, vars(args)).interval() or []) or None,
        "cfg_channels": args.cfg_channels,
        "label_sampling": args.label_sampling, "global_seed": args.global_seed,
        # Equal labels are a shuffle of all --num-fid-samples: another count gives every index
        # another label, so a folder of one count is never topped up to another.
        "equal_labels_of": args.num_fid_samples if args.label_sampling == "equal" else None,
        "world_size": world_size, "per_proc_batch_size": args.per_proc_batch_size,
        "device": device.type, "tf32": args.tf32 if device.type == "cuda" else None,
        "sampler_version": SAMPLER_VERSION, "torch": torch.__version__,
        "diffusers": diffusers.__version__, "timm": timm.__version__,
    } | (flow_settings(config, sampler) if config.transport is not None else {})


def flow_settings(config: ModelConfig, sampler) -> dict:
    """What else decides a SiT's images: its transport and the ODE's or SDE's options."""
    transport = config.transport
    return {"path_type": transport.path_type, "prediction": transport.prediction,
            "loss_weight": transport.loss_weight, "sample_eps": transport.sample_eps,
            "train_eps": transport.train_eps, "sampling_method": sampler.method,
            "atol": sampler.atol, "rtol": sampler.rtol, "reverse": sampler.reverse,
            "diffusion_form": sampler.diffusion_form, "diffusion_norm": sampler.diffusion_norm,
            "last_step": sampler.last_step, "last_step_size": sampler.last_step_size}


def official_name(ckpt: str) -> bool:
    """--ckpt names an official checkpoint that is not a local file (find_model downloads it)."""
    return ckpt in PRETRAINED_MODELS and not Path(ckpt).is_file()


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
        differences = [f"{key} {saved.get(key)!r} there, {value!r} now"
                       for key, value in settings.items() if saved.get(key) != value]
        if differences:
            raise ValueError(f"{folder} holds images sampled with other settings "
                             f"({'; '.join(differences)}); rerun with --overwrite to delete them "
                             f"and start again, or choose another --sample-dir")
    elif any(folder.glob("*.png")):
        raise ValueError(f"{folder} holds PNGs but no {SAMPLES_META} saying how they were made "
                         f"(an earlier version or another script wrote them); rerun with "
                         f"--overwrite to delete them, or choose another --sample-dir")
    folder.mkdir(parents=True, exist_ok=True)
    if not meta_path.is_file():
        with atomic_write(meta_path) as handle:
            handle.write(json.dumps(settings, indent=1).encode())
    count, freed = (a + b for a, b in zip(remove_stale_temporaries(folder, started),
                                           remove_stale_temporaries(folder.parent, started)))
    if count:
        print(f"Removed {count} temporary file(s) of an interrupted run ({format_bytes(freed)})")


def balanced_labels(count: int, num_classes: int, seed: int) -> torch.Tensor:
    """--label-sampling equal: every class count // num_classes times (the first count % num_classes
    classes once more), in an order shuffled by the seed; image i gets label i."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return (torch.arange(count) % num_classes)[order]


def create_npz_from_sample_folder(sample_dir: Path, num: int, labels: np.ndarray) -> Path:
    """Stack {0..num-1}.png into arr_0 (N, H, W, 3) uint8 and the labels into arr_1, atomically."""
    missing = [i for i in range(num) if not (sample_dir / f"{i:06d}.png").is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} of {num} PNGs are missing from {sample_dir} (first: "
                           f"{missing[0]:06d}.png)")
    samples = np.stack([np.asarray(Image.open(sample_dir / f"{i:06d}.png"))
                        for i in tqdm(range(num), desc="npz")])
    if samples.shape != (num, *samples.shape[1:3], 3) or samples.dtype != np.uint8:
        raise RuntimeError(f"expected {num} RGB uint8 images, got an array of {samples.shape} "
                           f"{samples.dtype}")
    npz_path = sample_dir.with_name(sample_dir.name + ".npz")
    with atomic_write(npz_path, expected_bytes=samples.nbytes + 8 * num) as handle:
        np.savez(handle, arr_0=samples, arr_1=labels[:num])
    print(f"Saved .npz file to {npz_path} [arr_0 shape={samples.shape}, "
          f"arr_1 shape={labels[:num].shape}]")
    return npz_path


def main(args: argparse.Namespace) -> None:
    settings = settings_from(SamplingSettings, vars(args))
    settings.check(min_cfg_scale=1.0)  # checked first; the official script asserts cfg-scale >= 1
    require_positive(per_proc_batch_size=args.per_proc_batch_size,
                     num_fid_samples=args.num_fid_samples)
    check_output_folder(args.sample_dir, "--sample-dir")
    with distributed(args.device) as (rank, world_size, device):
        sample(args, settings, rank, world_size, device)


@torch.no_grad()
def sample(args: argparse.Namespace, settings: SamplingSettings, rank: int, world_size: int,
           device: torch.device) -> None:
    # As the official script: --tf32 sets the matmul flag only; cuDNN keeps its default (TF32 on).
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    started = time.time()
    seed = args.global_seed * world_size + rank
    torch.manual_seed(seed)

    source = settings_from(ModelSource, vars(args))
    model, vae, config = load_model_for_sampling(source, device, default_vae="ema")
    sampler = settings.build(min_cfg_scale=1.0, transport=config.transport)
    channels, latent_size = model.in_channels, model.input_size

    model_string_name = config.model.replace("/", "-")
    ckpt_string_name = Path(args.ckpt).stem if args.ckpt else "pretrained"
    vae_name = Path(config.vae).name if config.vae not in ("ema", "mse", "none") else config.vae
    interval = settings.interval()
    # The official name, then what our additions change (meta.json tells the other settings apart).
    folder_name = (f"{model_string_name}-{ckpt_string_name}-size-{config.image_size}-"
                   f"vae-{vae_name}-cfg-{args.cfg_scale}-seed-{args.global_seed}"
                   + ("" if sampler.name == "ddpm" else f"-{sampler.name}")
                   + ("" if args.cfg_channels == "3" else "-cfg-all-channels")
                   + ("" if args.label_sampling == "random" else "-equal-labels")
                   + (f"-interval-{interval[0]}-{interval[1]}" if interval else ""))
    sample_folder_dir = Path(args.sample_dir) / folder_name
    meta = sample_settings(args, config, sampler, world_size, device) if rank == 0 else None
    rank_zero_decides(rank, lambda: prepare_sample_folder(sample_folder_dir, meta, args.overwrite,
                                                          started))
    if rank == 0:
        print(f"Saving .png samples at {sample_folder_dir}")

    n = args.per_proc_batch_size
    global_batch_size = n * world_size
    total_samples = int(math.ceil(args.num_fid_samples / global_batch_size) * global_batch_size)
    if rank == 0:
        print(f"Total number of images that will be sampled: {total_samples}")
    iterations = total_samples // world_size // n
    # A SiT's forward gives in_channels (its unused upper half dropped), a DiT's out_channels.
    predicted = model.in_channels if config.transport is not None else model.out_channels
    stand_in = NoNetwork(model.num_classes, predicted)
    balanced = balanced_labels(args.num_fid_samples, config.num_classes, args.global_seed)
    labels_by_index = {}
    skipped = 0
    total = 0
    for _ in tqdm(range(iterations), disable=rank != 0):
        noise = torch.randn(n, channels, latent_size, latent_size, device=device)
        indices = [i * world_size + rank + total for i in range(n)]
        if args.label_sampling == "equal":
            labels = torch.tensor([int(balanced[i]) if i < len(balanced) else i % config.num_classes
                                   for i in indices], device=device)
        else:  # as the official script: drawn per batch from the rank's generator
            labels = torch.randint(0, config.num_classes, (n,), device=device)
        paths = [sample_folder_dir / f"{index:06d}.png" for index in indices]
        if all(readable_png(path) for path in paths):
            # Draw exactly what sampling this batch draws (ODE solvers and the interval draw none).
            generate(stand_in, sampler, noise, labels, args.cfg_scale, interval=interval)
            skipped += n
        else:
            latents = generate(model, sampler, noise, labels, args.cfg_scale, interval=interval,
                               pixels=vae is None, guide_all_channels=settings.guide_all_channels)
            for array, path in zip(to_uint8_images(decode(vae, latents)), paths):
                save_png(array, path)
        labels_by_index.update(zip(indices, labels.tolist()))
        total += global_batch_size

    gathered = [None] * world_size
    dist.all_gather_object(gathered, labels_by_index)
    skipped_counts = [None] * world_size
    dist.all_gather_object(skipped_counts, skipped)
    if rank == 0:
        if sum(skipped_counts):
            print(f"Kept {sum(skipped_counts)} existing samples, drew "
                  f"{total_samples - sum(skipped_counts)} new ones")
        merged = {index: label for part in gathered for index, label in part.items()}
        labels_array = np.array([merged[i] for i in range(total_samples)], dtype=np.int64)
        create_npz_from_sample_folder(sample_folder_dir, args.num_fid_samples, labels_array)
        print("Done.")
    dist.barrier()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Sample PNGs and an FID .npz with DDP.")
    add_model_flags(parser, default_vae="ema")
    add_sampler_flags(parser, cfg_scale=1.5)
    add_device_flags(parser, tf32_help="TF32 matmuls on Ampere+ GPUs (faster, barely changes FID); "
                                       "cuDNN's own flag is left alone, as in the official script")
    output = parser.add_argument_group("output")
    output.add_argument("--sample-dir", type=str, default="samples")
    output.add_argument("--per-proc-batch-size", type=int, default=32)
    output.add_argument("--num-fid-samples", type=int, default=50_000)
    output.add_argument("--global-seed", type=int, default=0)
    output.add_argument("--label-sampling", choices=["random", "equal"], default="random",
                        help="random: each label drawn uniformly, as the official script; "
                             "equal: exactly N/num_classes images of every class (lowers FID-50K "
                             "by about 0.1, per RAE)")
    output.add_argument("--overwrite", action="store_true",
                        help="delete the folder's images, meta.json and .npz first; start again")
    return parser.parse_args(argv)


if __name__ == "__main__":
    with one_line_errors():
        main(parse_args())
