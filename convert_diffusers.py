"""Convert DiT weights to and from Hugging Face diffusers (the mapping: ditlib/diffusers_format.py).

    python convert_diffusers.py export --ckpt results/.../0400000.pt --out dit-diffusers [--vae ema]
    python convert_diffusers.py import --folder dit-diffusers --out dit.pt

Export writes a DiTTransformer2DModel folder (and, with --vae, a DiTPipeline folder around it);
import writes a state dict that models.py loads with strict=True.
"""
import argparse
from pathlib import Path

import torch

from ditlib.command_line import add_model_flags, settings_from
from ditlib.diffusers_format import read_diffusers_weights, to_diffusers
from ditlib.errors import one_line_errors
from ditlib.files import atomic_torch_save
from ditlib.weights import ModelSource, load_model_for_sampling
from models import DiT


def export_command(args: argparse.Namespace) -> None:
    # The VAE is loaded only for a pipeline; otherwise the checkpoint's (or the official) geometry.
    source = settings_from(ModelSource, vars(args))
    model, vae, config = load_model_for_sampling(source, torch.device("cpu"), default_vae="ema",
                                                 with_vae=args.vae is not None)
    if config.transport is not None:
        raise ValueError(f"--ckpt holds a {config.model}: diffusers has no SiT pipeline (its "
                         f"DiTPipeline would read the velocity as DDPM noise); sample it with "
                         f"sample.py --sampler ode or sde")
    transformer = to_diffusers(model)
    out = Path(args.out)
    if vae is None:
        transformer.save_pretrained(out)
    else:
        from diffusers import DDIMScheduler, DiTPipeline
        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                  beta_end=0.02, clip_sample=False)
        DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).save_pretrained(out)
    print(f"Wrote {out}")


def import_command(args: argparse.Namespace) -> None:
    state_dict, kwargs = read_diffusers_weights(args.folder, "folder")
    DiT(**kwargs).load_state_dict(state_dict, strict=True)
    atomic_torch_save(state_dict, args.out)
    print(f"Wrote {args.out} ({', '.join(f'{k}={v}' for k, v in kwargs.items())})")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="DiT checkpoint -> diffusers folder")
    add_model_flags(export, default_vae="ema",
                    vae_help="also write a DiTPipeline with this VAE (ema, mse or a folder)")
    export.add_argument("--out", required=True)
    importer = commands.add_parser("import", help="diffusers folder -> DiT state dict")
    importer.add_argument("--folder", required=True,
                          help="a DiTTransformer2DModel folder or a DiTPipeline folder")
    importer.add_argument("--out", required=True)
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    (export_command if args.command == "export" else import_command)(args)


if __name__ == "__main__":
    with one_line_errors():
        main(parse_args())
