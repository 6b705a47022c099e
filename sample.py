"""Sample a grid of class-conditional images from a DiT: `python sample.py --image-size 512 --seed 1`.

With no --ckpt it uses the official DiT-XL/2 weights (downloaded on first use). A seeded run gives
the official script's image: seed, build the model (its random init draws from the generator),
load the weights, load the VAE, and only then draw the noise.
"""
import argparse
from pathlib import Path

import torch

from images import check_image_path, save_image_grid
from latents import decode
from processes import require_positive, resolve_device, run_cli
from sampling import add_sampling_flags, check_sampling_flags, guided_batch, run_sampler, sampling_diffusion
from weights import load_model_for_sampling

OFFICIAL_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]


@torch.no_grad()
def main(args: argparse.Namespace) -> Path:
    check_sampling_flags(args, min_cfg_scale=0.0)  # 0: the unconditional model; below 0 pushes away from the class
    require_positive(args, "nrow")
    check_image_path(args.output, "--output")
    # The official sample.py turns TF32 on for matmuls and cuDNN (a no-op before Ampere and on CPU).
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    diffusion = sampling_diffusion(args.sampler, args.num_sampling_steps)  # draws nothing; refuses bad counts early
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    model, vae, config = load_model_for_sampling(args, device, default_vae="mse")
    labels = args.class_labels if args.class_labels is not None else OFFICIAL_LABELS
    bad = [label for label in labels if not 0 <= label < config["num_classes"]]
    if bad:
        raise ValueError(f"--class-labels {bad} outside [0, {config['num_classes'] - 1}]")
    channels, latent_size = model.in_channels, model.input_size

    noise = torch.randn(len(labels), channels, latent_size, latent_size, device=device)
    y = torch.tensor(labels, device=device)
    x, model_fn, model_kwargs = guided_batch(noise, y, config["num_classes"], args.cfg_scale, model, guided=True,
                                          interval=args.cfg_interval)
    samples = run_sampler(diffusion, args.sampler, model_fn, x, model_kwargs, eta=args.eta, progress=True,
                          pixels=vae is None)
    samples = samples[: len(labels)]  # drop the null-class half
    output = save_image_grid(decode(vae, samples), args.output, nrow=args.nrow)
    print(f"Saved {len(labels)} samples to {output}")
    return output


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Sample a grid of images from a DiT.")
    official = parser.add_argument_group("official flags (defaults as the official script; model flags "
                                         "fall back to a train.py checkpoint's own args)")
    official.add_argument("--model", type=str, default=None, help="default DiT-XL/2")
    official.add_argument("--vae", type=str, default=None, help="ema | mse (default) | none | local AutoencoderKL folder")
    official.add_argument("--image-size", type=int, default=None, help="default 256")
    official.add_argument("--num-classes", type=int, default=None, help="default 1000")
    official.add_argument("--cfg-scale", type=float, default=4.0)
    official.add_argument("--num-sampling-steps", type=int, default=250)
    official.add_argument("--seed", type=int, default=0)
    official.add_argument("--ckpt", type=str, default=None, help="a train.py checkpoint, a state dict or .safetensors")
    extra = parser.add_argument_group("additions")
    extra.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                       help="TF32 matmuls and convolutions on Ampere+ GPUs, as the official script")
    extra.add_argument("--class-labels", type=int, nargs="+", default=None, help=f"default {OFFICIAL_LABELS}")
    add_sampling_flags(extra)
    extra.add_argument("--output", type=str, default="sample.png")
    extra.add_argument("--nrow", type=int, default=4, help="images per grid row")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_args())
