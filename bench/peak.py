"""The machine's matmul ceiling at DiT's shapes: the number every other benchmark is a fraction of.

    python bench/peak.py [--device cpu] [--repeats 5] [--smoke]

A DiT block is mostly (tokens x width) @ (width x 4 width) products: the MLP, the fused qkv, the
adaLN regressions. This times those shapes for DiT-S, B and XL widths at 2,048 tokens (8 images
of 256 tokens), in fp32 and bf16 (CPUs without bf16 units run bf16 slower than fp32: the ratio shows it).
"""
import argparse

import torch

from bench.harness import machine, markdown, rate, timed

WIDTHS = {"S": 384, "B": 768, "XL": 1152}


def matmul_rows(device: torch.device, dtype: torch.dtype, tokens: int, repeats: int,
                widths: dict = WIDTHS) -> list[tuple[str, float, dict, float]]:
    """(shape name, GFLOP per product, timing, GFLOP/s median) for each width."""
    rows = []
    generator = torch.Generator().manual_seed(0)
    for name, width in widths.items():
        a = torch.randn(tokens, width, generator=generator).to(device, dtype)
        b = torch.randn(width, 4 * width, generator=generator).to(device, dtype)
        gflop = 2 * tokens * width * 4 * width / 1e9
        result = timed(lambda: torch.mm(a, b), device, repeats, warmup=2)
        rows.append((f"{name}: {tokens}x{width} @ {width}x{4 * width}", gflop, result, gflop / result["median"]))
    return rows


def fp32_peak(device: torch.device, repeats: int = 5, tokens: int = 2048) -> float:
    """The best median fp32 GFLOP/s over DiT's shapes: the ceiling the model benchmarks divide by."""
    return max(row[3] for row in matmul_rows(device, torch.float32, tokens, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat: checks the script runs")
    args = parser.parse_args()
    device = torch.device(args.device)
    tokens, repeats, widths = (64, 1, {"S": 32}) if args.smoke else (args.tokens, args.repeats, WIDTHS)

    rows, baseline = [], {}
    for dtype in (torch.float32, torch.bfloat16):
        for shape, gflop, result, median in matmul_rows(device, dtype, tokens, repeats, widths):
            baseline.setdefault(shape, median)
            rows.append([shape, "fp32" if dtype == torch.float32 else "bf16", rate(result, gflop),
                         f"{median / baseline[shape]:.2f}x"])
    print(f"Matmul throughput, GFLOP/s, median (min-max) of {repeats}; {machine(device)}\n")
    print(markdown(["shape", "dtype", "GFLOP/s", "vs fp32"], rows, left=2))


if __name__ == "__main__":
    main()
