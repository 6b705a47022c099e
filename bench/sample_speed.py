"""Seconds per image of class-conditional sampling with classifier-free guidance, eager vs compiled.

    python bench/sample_speed.py [--model DiT-S/2] [--images 8] [--measured-steps 5] [--repeats 3] [--smoke]

A 256px-equivalent latent (4 x 32 x 32), the 8 images sample.py draws by default, guided (so the
network runs on 16 latents per step). Every step of a sampler costs the same, so each row times a
few steps of the respaced loop and scales to a full 250-step ancestral (DDPM) or 50-step DDIM run.
"compiled" is torch.compile of forward_with_cfg (inductor). The VAE decode is not included (the SD
VAE cannot be fetched offline); random weights cost what trained ones do.
"""
import argparse

import torch

from bench.harness import machine, markdown, random_weights, spread, timed
from ditlib.samplers import Sampler
from models import DiT_models

RUNS = [("ddpm", 250), ("ddim", 50)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--measured-steps", type=int, default=5, help="sampling steps per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a tiny model, one repeat: checks the script runs")
    args = parser.parse_args()
    device = torch.device(args.device)
    input_size = 32
    if args.smoke:
        args.model, args.images, args.measured_steps, args.repeats, input_size = "DiT-Nano/4", 2, 2, 1, 8

    torch.manual_seed(0)
    model = random_weights(DiT_models[args.model](input_size=input_size)).to(device).eval()
    noise = torch.randn(args.images, 4, input_size, input_size, device=device)
    labels = torch.arange(args.images, device=device) % 1000
    # The guided batch generate() builds: the images twice, with their labels and with the null class.
    x, model_fn = torch.cat([noise, noise]), model.forward_with_cfg
    model_kwargs = dict(y=torch.cat([labels, torch.full_like(labels, 1000)]), cfg_scale=args.cfg_scale)
    compiled_fn = torch.compile(model_fn)

    rows, eager_step = [], {}
    for sampler, steps in RUNS:
        # The first measured_steps steps of the full schedule's stride: the same work per step.
        chosen = Sampler(sampler, args.measured_steps)
        for mode, fn in (("eager", model_fn), ("compiled", compiled_fn)):
            with torch.no_grad():
                result = timed(lambda: chosen.run(fn, x, model_kwargs), device, args.repeats,
                               warmup=1)
            per_step = {k: v / args.measured_steps for k, v in result.items() if k != "runs"}
            eager_step.setdefault(sampler, per_step["median"])
            per_image = steps / args.images
            rows.append([sampler, steps, mode, spread(per_step), spread(per_step, per_image, 2),
                         f"{eager_step[sampler] / per_step['median']:.2f}x"])
    print(f"Guided sampling of {args.model}, {args.images} images (network batch {x.shape[0]}), cfg {args.cfg_scale}, "
          f"{8 * input_size}px-equivalent latents; median (min-max) of {args.repeats} runs of "
          f"{args.measured_steps} steps; {machine(device)}\n")
    print(markdown(["sampler", "steps", "mode", "s/step", "s/image (full run)", "speed vs eager"], rows, left=1))


if __name__ == "__main__":
    main()
