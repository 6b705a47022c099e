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
from ditlib.files import atomic_folder, atomic_torch_save, check_output_file, check_output_folder
from ditlib.weights import ModelSource, load_model_for_sampling
from models import DiT


def export_command(args: argparse.Namespace) -> None:
    out = Path(args.out)
    check_export_folder(out, args.overwrite)
    # The VAE is loaded only for a pipeline; otherwise the checkpoint's (or the official) geometry.
    source = settings_from(ModelSource, vars(args))
    model, vae, config = load_model_for_sampling(source, torch.device("cpu"), default_vae="ema",
                                                 with_vae=args.vae is not None)
    if config.transport is not None:
        raise ValueError(f"--ckpt holds a {config.model}: diffusers has no SiT pipeline (its "
                         f"DiTPipeline would read the velocity as DDPM noise); sample it with "
                         f"sample.py --sampler ode or sde")
    exported = to_diffusers(model)
    if vae is not None:
        from diffusers import DDIMScheduler, DiTPipeline
        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                  beta_end=0.02, clip_sample=False)
        exported = DiTPipeline(transformer=exported, vae=vae, scheduler=scheduler)
    with atomic_folder(out) as staging:
        exported.save_pretrained(staging)
    print(f"Wrote {out}")


def check_export_folder(out: Path, overwrite: bool) -> None:
    """Exporting into a folder that holds files would mix them with this export's: a transformer
    written beside an earlier pipeline's was never read, by import or by DiTPipeline."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"--out {out} is not empty; pass --overwrite to replace it with this "
                             f"export, or choose another folder")
        if not any((out / name).is_file() for name in ("config.json", "model_index.json")):
            raise ValueError(f"--out {out} is not a diffusers folder (no config.json or "
                             f"model_index.json); --overwrite replaces only an earlier export")
    check_output_folder(out.parent, f"the folder of --out {out.name}")


def import_command(args: argparse.Namespace) -> None:
    check_output_file(args.out, "--out")
    if Path(args.out).exists() and not args.overwrite:
        raise ValueError(f"--out {args.out} exists; pass --overwrite to replace it, or choose "
                         f"another file")
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
    export.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export in --out")
    importer = commands.add_parser("import", help="diffusers folder -> DiT state dict")
    importer.add_argument("--folder", required=True,
                          help="a DiTTransformer2DModel folder or a DiTPipeline folder")
    importer.add_argument("--out", required=True)
    importer.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    (export_command if args.command == "export" else import_command)(args)


if __name__ == "__main__":
    with one_line_errors():
        main(parse_args())
