"""Parameter count and forward Gflops of the 12 DiT configs, counted from the model's own ops.

    python bench/model_table.py [--image-size 256 512] [--markdown]
    python bench/model_table.py --designs [--markdown]      # the four block designs at 256px

Models are built on the meta device, so even DiT-XL/2 at 512px costs no memory and under a second.
Gflops here means multiply-accumulates of one single-image forward (the paper's convention).
"""
import argparse

import torch

from models import BLOCK_DESIGNS, DiT_models, count_forward_gmacs

PAPER_GFLOPS_256 = {  # Peebles & Xie, Table 4, for the side-by-side column only
    "DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06, "DiT-B/8": 1.42, "DiT-B/4": 5.56, "DiT-B/2": 23.01,
    "DiT-L/8": 5.01, "DiT-L/4": 19.70, "DiT-L/2": 80.71, "DiT-XL/8": 7.39, "DiT-XL/4": 29.05, "DiT-XL/2": 118.64,
}
# The block-design figure of the paper (Figure 5 legend): DiT-XL/2 at 256px.
PAPER_XL2_DESIGN_GFLOPS = {"adaln-zero": 118.6, "adaln": 118.6, "cross-attention": 137.6, "in-context": 119.4}


def size_table(image_sizes: list[int]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "params"] + [f"Gflops {s}px" for s in image_sizes] + ["paper Gflops 256px"]
    rows = []
    for name in PAPER_GFLOPS_256:
        flops, params = [], None
        for size in image_sizes:
            with torch.device("meta"):
                model = DiT_models[name](input_size=size // 8)
            if params is None:
                params = sum(p.numel() for p in model.parameters())
            flops.append(f"{count_forward_gmacs(model):.2f}")
        rows.append([name, f"{params:,}"] + flops + [f"{PAPER_GFLOPS_256[name]:.2f}"])
    return header, rows


def design_table(names=("DiT-S/2", "DiT-B/2", "DiT-XL/2")) -> tuple[list[str], list[list[str]]]:
    header = ["model", "block", "params", "Gflops 256px", "vs adaLN-Zero", "paper Gflops (XL/2)"]
    rows = []
    for name in names:
        baseline = None
        for design in BLOCK_DESIGNS:
            with torch.device("meta"):
                model = DiT_models[name](input_size=32, block=design)
            gflops = count_forward_gmacs(model)
            baseline = baseline or gflops
            paper = f"{PAPER_XL2_DESIGN_GFLOPS[design]:.1f}" if name == "DiT-XL/2" else ""
            rows.append([name, design, f"{sum(p.numel() for p in model.parameters()):,}", f"{gflops:.2f}",
                         f"{gflops / baseline - 1:+.1%}", paper])
    return header, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, nargs="+", default=[256, 512],
                        help="image sizes in pixels; the latent is 8x smaller (SD VAE)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table (as in README)")
    parser.add_argument("--designs", action="store_true", help="compare the four block designs instead")
    args = parser.parse_args()
    for size in args.image_size:
        if size % 8:
            parser.error(f"--image-size {size} is not a multiple of 8 (the VAE downsamples by 8)")

    header, rows = design_table() if args.designs else size_table(args.image_size)
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" if column in ("model", "block") else "---:" for column in header) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        for row in [header] + rows:
            print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))


if __name__ == "__main__":
    main()
