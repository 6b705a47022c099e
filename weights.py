"""DiT weights into models: strict loads that name what does not fit, fine-tuning starts, and the
model a sampling script builds from a checkpoint and its saved flags."""
import argparse
from pathlib import Path
from typing import Optional

import torch

from checkpoints import checkpoint_args, load_state_dict, read_checkpoint, weights_in
from diffusers_interop import read_diffusers_weights
from download import PRETRAINED_MODELS, find_model
from latents import latent_shape, load_vae
from models import BLOCK_DESIGNS, DiT_models


def load_weights(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    """load_state_dict(strict=True), but a mismatch names the tensors and the likely right flags."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if not (missing or unexpected or wrong):
        model.load_state_dict(state_dict, strict=True)
        return
    lines = [f"the checkpoint {source} does not fit the chosen model"]
    if wrong:
        lines.append("mismatched shapes: " + "; ".join(wrong[:6]) + (" ..." if len(wrong) > 6 else ""))
    if missing:
        lines.append(f"missing from the checkpoint: {', '.join(missing[:6])}" + (" ..." if len(missing) > 6 else ""))
    if unexpected:
        lines.append(f"not in the model: {', '.join(unexpected[:6])}" + (" ..." if len(unexpected) > 6 else ""))
    hint = guess_config(state_dict)
    if hint:
        lines.append(f"it looks like {hint}")
    raise ValueError("\n  ".join(lines))


# Tensors a fine-tuning run may take from the model's own initialisation when the source's do not
# fit: the label table (another class count) and the fixed sin-cos position table (another grid).
REINITIALISED_ON_MISMATCH = {"y_embedder.embedding_table.weight": "re-initialised the label table as the model does",
                             "pos_embed": "rebuilt the fixed sin-cos position table for the new grid"}


def load_init_weights(model: torch.nn.Module, source: str) -> list:
    """Start a new run from existing weights (train.py --init-from): anything find_model reads, or a
    diffusers folder. Every tensor is loaded, except a label or position table of another size,
    which keeps the model's own initialisation; any other mismatch is a one-line error naming the
    tensor and the config the weights look like. Returns lines for the log."""
    if Path(source).is_dir():
        state_dict, _ = read_diffusers_weights(source, "--init-from")
    else:
        if source in PRETRAINED_MODELS:  # check the shapes the name implies before a 2.7 GB download
            check_fits_official(model, source)
        state_dict = find_model(source)
    own = model.state_dict()
    taken, notes, problems = {}, [], []
    for name, value in own.items():
        if name not in state_dict:
            problems.append(f"{name} is missing from it")
        elif state_dict[name].shape == value.shape:
            taken[name] = state_dict[name]
        elif name in REINITIALISED_ON_MISMATCH:
            notes.append(f"{REINITIALISED_ON_MISMATCH[name]} ({tuple(state_dict[name].shape)} there, "
                         f"{tuple(value.shape)} here)")
        else:
            problems.append(f"{name} is {tuple(state_dict[name].shape)} there, {tuple(value.shape)} here")
    problems += [f"{name} is not in this model" for name in state_dict if name not in own]
    if problems:
        hint = guess_config(state_dict)
        raise ValueError(f"--init-from {source} does not fit this model: {'; '.join(problems[:4])}"
                         f"{' ...' if len(problems) > 4 else ''}" + (f"; the weights look like {hint}" if hint else ""))
    model.load_state_dict({**own, **taken}, strict=True)
    return [f"Initialised from {source}: loaded {len(taken)} of {len(own)} tensors"] + notes


def check_fits_official(model: torch.nn.Module, name: str) -> None:
    """An official checkpoint is DiT-XL/2 (width 1152, depth 28, patch 2, 4 latent channels); a
    model of another size or design cannot take it, whatever its image size or classes."""
    with torch.device("meta"):
        official = DiT_models["DiT-XL/2"](input_size=8)
    ours = (len(model.blocks), model.pos_embed.shape[-1], model.patch_size, model.in_channels, model.block)
    theirs = (len(official.blocks), official.pos_embed.shape[-1], official.patch_size, official.in_channels,
              "adaln-zero")
    if ours != theirs:
        raise ValueError(f"--init-from {name} holds DiT-XL/2 weights (depth 28, width 1152, patch 2, 4 channels, "
                         f"adaln-zero); this model has depth {ours[0]}, width {ours[1]}, patch {ours[2]}, "
                         f"{ours[3]} channels, {ours[4]}: use --model DiT-XL/2 with a VAE")


def guess_config(state_dict: dict) -> Optional[str]:
    """Which --model/--image-size/--num-classes a DiT state dict was trained with, from its shapes."""
    try:
        width, channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
        tokens = state_dict["pos_embed"].shape[1]
        depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
        rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
    except (KeyError, ValueError, AttributeError):
        return None
    latent = int(round(tokens ** 0.5)) * patch
    design = block_design(state_dict)
    names = []
    for name, make in DiT_models.items():
        with torch.device("meta"):
            candidate = make(input_size=8)  # 8: divisible by every config's patch size
        if (len(candidate.blocks), candidate.pos_embed.shape[-1], candidate.patch_size) == (depth, width, patch):
            names.append(name)
    model_flag = f"--model {names[0]}" if names else f"a DiT of depth {depth}, width {width}, patch {patch}"
    size = f"--image-size {latent * 8} with a VAE (or {latent} with --vae none)" if channels == 4 \
        else f"--image-size {latent} --vae none"
    block = f" --block {design}" if design != "adaln-zero" else ""
    return f"{model_flag} {size} --num-classes {rows - 1} (or {rows} without label dropout){block}"


def block_design(state_dict: dict) -> str:
    """Which of models.BLOCK_DESIGNS a DiT state dict holds, from its parameter names and shapes."""
    if "blocks.0.cross_attn.q.weight" in state_dict:
        return "cross-attention"
    modulation = state_dict.get("blocks.0.adaLN_modulation.1.weight")
    if modulation is None:
        return "in-context"
    return "adaln" if modulation.shape[0] == 4 * modulation.shape[1] else "adaln-zero"


OFFICIAL_DEFAULTS = {"model": "DiT-XL/2", "image_size": 256, "num_classes": 1000, "class_dropout_prob": 0.1}


def resolve_model_args(args, default_vae: str, saved: dict) -> dict:
    """Model flags not given on the command line come from a train.py checkpoint's saved args
    (ours or the official script's), else the official defaults; pretrained weights exist only for
    DiT-XL/2, 256/512px, 1000 classes."""
    resolved = {key: getattr(args, key) if getattr(args, key, None) is not None else saved.get(key, default)
                for key, default in OFFICIAL_DEFAULTS.items()}
    resolved["vae"] = args.vae if args.vae is not None else saved.get("vae", default_vae)
    resolved["block"] = getattr(args, "block", None) or saved.get("block")  # None: read from the weights
    has_pretrained = (resolved["model"], resolved["num_classes"]) == ("DiT-XL/2",
                                                                      1000) and resolved["image_size"] in (256, 512)
    if args.ckpt is None and not has_pretrained:
        raise ValueError("only DiT-XL/2 at 256 or 512px with 1000 classes has pretrained weights; "
                         "pass --ckpt for other models")
    return resolved


def build_model(config: dict, channels: int, latent_size: int, device: torch.device) -> torch.nn.Module:
    if config["model"] not in DiT_models:
        raise ValueError(f"--model {config['model']!r} is unknown; choose from {', '.join(DiT_models)}")
    model = DiT_models[config["model"]](input_size=latent_size, in_channels=channels,
                                       num_classes=config["num_classes"],
                                       class_dropout_prob=config["class_dropout_prob"], block=config["block"])
    return model.to(device)


def load_model_for_sampling(args, device: torch.device, default_vae: str, with_vae: bool = True):
    """(model in eval mode with its weights, VAE or None, resolved config), in the official order:
    the model is built (drawing its random init) and loaded before the VAE, so seeded runs match.
    The weights are read first (that draws nothing), so a bare state dict names its block design.
    with_vae=False sizes the model for the configured VAE without loading it."""
    checkpoint = None
    if args.ckpt in PRETRAINED_MODELS and not Path(args.ckpt).is_file():  # an official name, as find_model takes
        size = int(args.ckpt.rsplit("x", 1)[1].split(".")[0])
        if args.image_size not in (None, size):
            raise ValueError(f"--ckpt {args.ckpt} is the {size}px model; --image-size {args.image_size} does not match")
        args = argparse.Namespace(**{**vars(args), "ckpt": None, "image_size": size})
    if args.ckpt is not None:
        if not Path(args.ckpt).is_file():
            raise ValueError(f"--ckpt {args.ckpt}: no such file")
        if Path(args.ckpt).suffix != ".safetensors":
            checkpoint = read_checkpoint(args.ckpt)  # read once: its args and its weights
    config = resolve_model_args(args, default_vae, checkpoint_args(checkpoint))
    if config["image_size"] < 1:
        raise ValueError(f"--image-size must be a positive number of pixels, got {config['image_size']}")
    if config["vae"] == "none":
        channels, latent_size = 3, config["image_size"]
    elif config["image_size"] % 8:
        raise ValueError(f"--image-size {config['image_size']} must be a multiple of 8 with a VAE")
    else:
        channels, latent_size = 4, config["image_size"] // 8  # checked against the VAE below
    ckpt = args.ckpt or f"DiT-XL-2-{config['image_size']}x{config['image_size']}.pt"
    if args.ckpt is None:
        state_dict = find_model(ckpt)
    else:
        state_dict = load_state_dict(Path(ckpt)) if checkpoint is None else weights_in(checkpoint, ckpt, args.weights)
        del checkpoint  # the optimizer state of a training checkpoint need not stay in memory
    config["block"] = config["block"] or block_design(state_dict)
    embedder = state_dict.get("x_embedder.proj.weight")
    if embedder is not None and embedder.shape[1] != channels:  # before the shapes fail somewhere less clear
        needs = "pixels: --vae none" if embedder.shape[1] == 3 else f"{embedder.shape[1]}-channel latents of a VAE"
        raise ValueError(f"--vae {config['vae']} gives the model {channels}-channel inputs, but the weights in {ckpt} "
                         f"take {embedder.shape[1]} channels ({needs})")
    model = build_model(config, channels, latent_size, device)
    load_weights(model, state_dict, ckpt)
    model.eval()
    vae = load_vae(config["vae"], device) if with_vae else None
    if vae is not None and latent_shape(vae, config["image_size"]) != (channels, latent_size):
        raise ValueError(f"the VAE {config['vae']} gives latents {latent_shape(vae, config['image_size'])}, "
                         f"the model expects {(channels, latent_size)}")
    return model, vae, config


def add_model_flags(parser: argparse.ArgumentParser, default_vae: str, vae_help: str = "") -> None:
    """What to sample from: the model flags of sample.py, sample_ddp.py and convert_diffusers.py. Those
    not given fall back to a train.py checkpoint's saved flags, then to the official defaults."""
    group = parser.add_argument_group("model (unset flags fall back to a train.py checkpoint's own, "
                                      "then to the official defaults)")
    group.add_argument("--ckpt", type=str, default=None,
                       help="a train.py checkpoint, a state dict, .safetensors or an official name "
                            "(default: the official DiT-XL/2 for --image-size, downloaded on first use)")
    group.add_argument("--model", type=str, default=None, help="default DiT-XL/2")
    group.add_argument("--vae", type=str, default=None,
                       help=vae_help or f"ema | mse | none | local AutoencoderKL folder (default {default_vae})")
    group.add_argument("--image-size", type=int, default=None, help="default 256")
    group.add_argument("--num-classes", type=int, default=None, help="default 1000")
    group.add_argument("--weights", choices=["ema", "model"], default="ema",
                       help="which weights of a train.py checkpoint")
    group.add_argument("--block", choices=BLOCK_DESIGNS, default=None,
                       help="block design (default: the checkpoint's, else read from its weights)")
