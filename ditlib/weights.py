"""DiT weights into models: strict loads that name what does not fit, fine-tuning starts, and the
model a sampling command builds from a checkpoint and its saved flags."""
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from ditlib.checkpoints import checkpoint_args, load_state_dict, read_checkpoint, weights_in
from ditlib.diffusers_format import read_diffusers_weights
from ditlib.errors import SettingError
from ditlib.latents import latent_shape, load_vae
from ditlib.pretrained import PRETRAINED_MODELS, find_model
from models import DiT_models, SiT_models
from transport import Transport, create_transport


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
        state_dict, _ = read_diffusers_weights(source, "init_from")
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
        raise SettingError("init_from", f"{source} does not fit this model: {'; '.join(problems[:4])}"
                                        f"{' ...' if len(problems) > 4 else ''}"
                                        + (f"; the weights look like {hint}" if hint else ""))
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
        raise SettingError("init_from", f"{name} holds DiT-XL/2 weights (depth 28, width 1152, patch 2, "
                                        f"4 channels, adaln-zero); this model has depth {ours[0]}, width "
                                        f"{ours[1]}, patch {ours[2]}, {ours[3]} channels, {ours[4]}: use "
                                        f"--model DiT-XL/2 with a VAE")


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


@dataclass(frozen=True)
class ModelSource:
    """The weights to sample from and the model they need (the fields are the sampling commands'
    flags; None: take it from the checkpoint's saved flags, else the official default)."""
    ckpt: Optional[str] = None
    model: Optional[str] = None
    vae: Optional[str] = None
    image_size: Optional[int] = None
    num_classes: Optional[int] = None
    weights: str = "ema"
    block: Optional[str] = None
    path_type: Optional[str] = None  # the transport of a SiT (SiT's flag names)
    prediction: Optional[str] = None
    loss_weight: Optional[str] = None
    train_eps: Optional[float] = None
    sample_eps: Optional[float] = None


TRANSPORT_SETTINGS = ("path_type", "prediction", "loss_weight", "train_eps", "sample_eps")


@dataclass(frozen=True)
class ModelConfig:
    """The model a source resolves to: every field set."""
    model: str
    image_size: int
    num_classes: int
    class_dropout_prob: float
    vae: str
    block: Optional[str]  # None until read from the weights
    transport: Optional[Transport] = None  # a SiT's; None for a DiT


OFFICIAL_DEFAULTS = {"model": "DiT-XL/2", "image_size": 256, "num_classes": 1000, "class_dropout_prob": 0.1}
MODELS = {**DiT_models, **SiT_models}
# The released weights: DiT-XL/2 at 256 and 512px, SiT-XL/2 at 256px, all for ImageNet's 1000 classes.
RELEASED = {("DiT-XL/2", 256), ("DiT-XL/2", 512), ("SiT-XL/2", 256)}


def resolve_model_config(source: ModelSource, default_vae: str, saved: dict) -> ModelConfig:
    """Model settings the source leaves unset come from a train.py checkpoint's saved flags (ours or
    the official script's), else the official defaults; pretrained weights exist only for DiT-XL/2,
    256/512px, 1000 classes."""
    given = {"model": source.model, "image_size": source.image_size, "num_classes": source.num_classes}
    resolved = {key: given[key] if given.get(key) is not None else saved.get(key, default)
                for key, default in OFFICIAL_DEFAULTS.items()}
    config = ModelConfig(**resolved, vae=source.vae if source.vae is not None else saved.get("vae", default_vae),
                         block=source.block or saved.get("block"), transport=model_transport(source, resolved, saved))
    if source.ckpt is None and not (config.num_classes == 1000 and (config.model, config.image_size) in RELEASED):
        if config.transport is not None:
            raise ValueError("only SiT-XL/2 at 256px with 1000 classes has pretrained weights; pass --ckpt for "
                             "other models")
        raise ValueError("only DiT-XL/2 at 256 or 512px with 1000 classes has pretrained weights; "
                         "pass --ckpt for other models")
    return config


def model_transport(source: ModelSource, resolved: dict, saved: dict) -> Optional[Transport]:
    """A SiT's transport: the settings given, else its checkpoint's, else SiT's defaults. A DiT has
    none, and refuses the settings by name."""
    given = {key: getattr(source, key) for key in TRANSPORT_SETTINGS if getattr(source, key) is not None}
    if resolved["model"] not in SiT_models:
        if given:
            raise SettingError(next(iter(given)), f"applies to SiT models only, not --model {resolved['model']}")
        return None
    settings = {key: given.get(key, saved.get(key)) for key in TRANSPORT_SETTINGS}
    return create_transport(settings["path_type"] or "Linear", settings["prediction"] or "velocity",
                            settings["loss_weight"], settings["train_eps"], settings["sample_eps"])


def build_model(config: ModelConfig, channels: int, latent_size: int, device: torch.device,
                learn_sigma: bool = True) -> torch.nn.Module:
    if config.model not in MODELS:
        raise SettingError("model", f"{config.model!r} is unknown; choose from {', '.join(MODELS)}")
    model = MODELS[config.model](input_size=latent_size, in_channels=channels, num_classes=config.num_classes,
                                 class_dropout_prob=config.class_dropout_prob, block=config.block,
                                 learn_sigma=learn_sigma)
    return model.to(device)


def load_model_for_sampling(source: ModelSource, device: torch.device, default_vae: str, with_vae: bool = True):
    """(model in eval mode with its weights, VAE or None, ModelConfig), in the official order: the
    model is built (drawing its random init) and loaded before the VAE, so seeded runs match. The
    weights are read first (that draws nothing), so a bare state dict names its block design.
    with_vae=False sizes the model for the configured VAE without loading it."""
    checkpoint = None
    if source.ckpt in PRETRAINED_MODELS and not Path(source.ckpt).is_file():  # an official name, as find_model takes
        model, size = released_model(source.ckpt)
        if source.image_size not in (None, size):
            raise SettingError("ckpt", f"{source.ckpt} is the {size}px model; --image-size {source.image_size} "
                                       f"does not match")
        source = replace(source, ckpt=None, image_size=size, model=source.model or model)
    if source.ckpt is not None:
        if not Path(source.ckpt).is_file():
            raise SettingError("ckpt", f"{source.ckpt}: no such file")
        if Path(source.ckpt).suffix != ".safetensors":
            checkpoint = read_checkpoint(source.ckpt)  # read once: its args and its weights
    config = resolve_model_config(source, default_vae, checkpoint_args(checkpoint))
    if config.image_size < 1:
        raise SettingError("image_size", f"must be a positive number of pixels, got {config.image_size}")
    if config.vae == "none":
        channels, latent_size = 3, config.image_size
    elif config.image_size % 8:
        raise SettingError("image_size", f"{config.image_size} must be a multiple of 8 with a VAE")
    else:
        channels, latent_size = 4, config.image_size // 8  # checked against the VAE below
    ckpt = source.ckpt or f"{config.model.replace('/', '-')}-{config.image_size}x{config.image_size}.pt"
    if source.ckpt is None:
        state_dict = find_model(ckpt)
    else:
        state_dict = load_state_dict(Path(ckpt)) if checkpoint is None else weights_in(checkpoint, ckpt, source.weights)
        del checkpoint  # the optimizer state of a training checkpoint need not stay in memory
    config = replace(config, block=config.block or block_design(state_dict))
    embedder = state_dict.get("x_embedder.proj.weight")
    if embedder is not None and embedder.shape[1] != channels:  # before the shapes fail somewhere less clear
        needs = "pixels: --vae none" if embedder.shape[1] == 3 else f"{embedder.shape[1]}-channel latents of a VAE"
        raise SettingError("vae", f"{config.vae} gives the model {channels}-channel inputs, but the weights in "
                                  f"{ckpt} take {embedder.shape[1]} channels ({needs})")
    # SiT's train.py writes 8 output channels (the upper half unused), its sample.py expects 4: both load.
    learn_sigma = config.transport is None or output_channels(state_dict) != channels
    model = build_model(config, channels, latent_size, device, learn_sigma)
    load_weights(model, state_dict, ckpt)
    model.eval()
    vae = load_vae(config.vae, device) if with_vae else None
    if vae is not None and latent_shape(vae, config.image_size) != (channels, latent_size):
        raise ValueError(f"the VAE {config.vae} gives latents {latent_shape(vae, config.image_size)}, "
                         f"the model expects {(channels, latent_size)}")
    return model, vae, config


def released_model(name: str) -> tuple[str, int]:
    """("SiT-XL/2", 256) for "SiT-XL-2-256x256.pt": the model and image size of a released file."""
    family, size, patch, pixels = name.removesuffix(".pt").split("-")
    return f"{family}-{size}/{patch}", int(pixels.split("x")[0])


def output_channels(state_dict: dict) -> Optional[int]:
    """The channels a state dict's final layer predicts (None when it has none)."""
    final, embedder = state_dict.get("final_layer.linear.weight"), state_dict.get("x_embedder.proj.weight")
    if final is None or embedder is None:
        return None
    return final.shape[0] // (embedder.shape[-1] ** 2)
