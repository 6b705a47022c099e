"""Sample a grid of class-conditional images from a DiT:

    python sample.py --image-size 512 --seed 1

With no --ckpt it uses the official DiT-XL/2 weights (downloaded on first use). A seeded run gives
the official script's image: seed, build the model (its random init draws from the generator),
load the weights, load the VAE, and only then draw the noise.
"""
import argparse
from pathlib import Path

import torch

from ditlib.command_line import add_device_flags, add_model_flags, add_sampler_flags, settings_from
from ditlib.errors import one_line_errors, require_positive
from ditlib.files import check_output_file
from ditlib.images import check_image_path, save_image_grid
from ditlib.latents import decode
from ditlib.processes import resolve_device
from ditlib.samplers import SamplingSettings, generate
from ditlib.weights import ModelSource, load_model_for_sampling
from transport import bits_per_dim, ode_likelihood

OFFICIAL_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]


@torch.no_grad()
def main(args: argparse.Namespace) -> Path:
    settings = settings_from(SamplingSettings, vars(args))
    settings.check(min_cfg_scale=0.0)  # 0: the unconditional model; below 0 pushes away
    if settings.likelihood and args.cfg_scale != 1:
        raise ValueError("--likelihood needs --cfg-scale 1: SiT computes the unguided model's "
                         "likelihood")
    require_positive(nrow=args.nrow)
    check_image_path(args.output, "--output")
    check_output_file(args.output, "--output")
    # The official sample.py turns TF32 on for matmuls and cuDNN (a no-op before Ampere and on CPU).
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    source = settings_from(ModelSource, vars(args))
    model, vae, config = load_model_for_sampling(source, device, default_vae="mse")
    sampler = settings.build(min_cfg_scale=0.0, transport=config.transport)
    labels = args.class_labels if args.class_labels is not None else OFFICIAL_LABELS
    bad = [label for label in labels if not 0 <= label < config.num_classes]
    if bad:
        raise ValueError(f"--class-labels {bad} outside [0, {config.num_classes - 1}]")

    size = model.input_size
    noise = torch.randn(len(labels), model.in_channels, size, size, device=device)
    samples = generate(model, sampler, noise, torch.tensor(labels, device=device), args.cfg_scale,
                       guided=True, interval=settings.interval(), progress=True, pixels=vae is None,
                       guide_all_channels=settings.guide_all_channels)
    output = save_image_grid(decode(vae, samples), args.output, nrow=args.nrow)
    print(f"Saved {len(labels)} samples to {output}")
    if settings.likelihood:
        logp, _ = ode_likelihood(config.transport, model.forward, samples,
                                 dict(y=torch.tensor(labels, device=device)), sampler.method,
                                 sampler.steps, sampler.atol, sampler.rtol)
        bpd = bits_per_dim(logp, samples[0].numel()).mean().item()
        print(f"Bits per dimension: {bpd:.4f} (the samples' log-likelihood under the model, SiT's "
              f"ODE estimate)")
    return output


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Sample a grid of images from a DiT.")
    add_model_flags(parser, default_vae="mse")
    add_sampler_flags(parser, cfg_scale=4.0)
    add_device_flags(parser, tf32_help="TF32 matmuls and convolutions on Ampere+ GPUs, as the "
                                       "official script")
    output = parser.add_argument_group("output")
    output.add_argument("--seed", type=int, default=0)
    output.add_argument("--class-labels", type=int, nargs="+", default=None,
                        help=f"default {OFFICIAL_LABELS}")
    output.add_argument("--output", type=str, default="sample.png")
    output.add_argument("--nrow", type=int, default=4, help="images per grid row")
    return parser.parse_args(argv)


if __name__ == "__main__":
    with one_line_errors():
        main(parse_args())
