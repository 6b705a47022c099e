"""Forward and training-step speed of DiT configs, as images/s and as a fraction of the matmul peak.

    python bench/model_speed.py [--models DiT-S/2 DiT-B/2] [--batch-size 8] [--repeats 5] [--smoke]

256px-equivalent latents (4 x 32 x 32). A training step is what train.py does per batch: the
diffusion loss (training_losses, random timesteps), backward, AdamW. Achieved GFLOP/s counts the
paper's Gflops (multiply-accumulates, counted from the model's own ops) x 2 FLOP x batch, and x 3
for forward + backward; the peak is bench/peak.py's best fp32 matmul rate, measured in the same run.
"""
import argparse

import torch

from bench.harness import machine, markdown, random_weights, rate, spread, timed
from bench.peak import fp32_peak
from diffusion import create_diffusion
from models import DiT_models, count_forward_gmacs


def training_step(model: torch.nn.Module, batch_size: int, device: torch.device, autocast_dtype=None):
    """One train.py-style step on a fixed random batch, as a closure for timed()."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, model.in_channels, model.input_size, model.input_size, generator=generator).to(device)
    y = torch.randint(0, model.num_classes, (batch_size,), generator=generator).to(device)
    diffusion = create_diffusion("")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0)

    def step() -> None:
        t = torch.randint(0, diffusion.num_timesteps, (batch_size,), device=device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def forward_pass(model: torch.nn.Module, batch_size: int, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, model.in_channels, model.input_size, model.input_size, generator=generator).to(device)
    t = torch.randint(0, 1000, (batch_size,), generator=generator).to(device)
    y = torch.randint(0, model.num_classes, (batch_size,), generator=generator).to(device)

    @torch.no_grad()
    def forward() -> None:
        model(x, t, y)
    return forward


def build(name: str, input_size: int, device: torch.device) -> tuple[torch.nn.Module, float]:
    """(model with random non-zero weights on device, its forward GMACs per image)."""
    with torch.device("meta"):
        gmacs = count_forward_gmacs(DiT_models[name](input_size=input_size))
    torch.manual_seed(0)
    return random_weights(DiT_models[name](input_size=input_size)).to(device), gmacs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=None, help="default: S/2, B/2 (and XL/2 on CUDA)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="a tiny model, one repeat: checks the script runs")
    args = parser.parse_args()
    device = torch.device(args.device)
    models = args.models or (["DiT-S/2", "DiT-B/2"] + (["DiT-XL/2"] if device.type == "cuda" else []))
    input_size, repeats, batch = 32, args.repeats, args.batch_size
    if args.smoke:
        models, input_size, repeats, batch = ["DiT-Nano/4"], 8, 1, 2

    peak = fp32_peak(device, repeats=max(repeats, 3)) if not args.smoke else fp32_peak(device, 1, tokens=64)
    rows = []
    for name in models:
        model, gmacs = build(name, input_size, device)
        forward_gflop = 2 * gmacs * batch
        for label, fn, gflop in (("forward", forward_pass(model.eval(), batch, device), forward_gflop),
                                 ("train step", training_step(model.train(), batch, device), 3 * forward_gflop)):
            result = timed(fn, device, repeats, warmup=1)
            achieved = gflop / result["median"]
            rows.append([name, label, batch, spread(result), rate(result, batch), f"{achieved:.1f}",
                         f"{achieved / peak:.0%}"])
        del model
    print(f"Model speed at {8 * input_size}px-equivalent latents, median (min-max) of {repeats}; "
          f"fp32 eager; matmul peak {peak:.1f} GFLOP/s; {machine(device)}\n")
    print(markdown(["model", "pass", "batch", "seconds", "images/s", "GFLOP/s", "of peak"], rows, left=2))


if __name__ == "__main__":
    main()
