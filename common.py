"""What train.py, extract_features.py and the sampling scripts share: processes, data, VAE, files."""
import argparse
import json
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar, Union

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageOps

from diffusion import create_diffusion
from download import (DownloadError, checkpoint_args, find_model, first_line, load_state_dict, read_checkpoint,
                      weights_in)
from files import atomic_write
from models import BLOCK_DESIGNS, DiT_models

T = TypeVar("T")

# The Stable Diffusion VAEs DiT was trained with, by their short names.
HUB_VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


# ---- processes ---------------------------------------------------------------------------------

def run_cli(main, args: argparse.Namespace) -> None:
    """Run a script's main; a mistake in its input ends it with one line naming the problem, not a traceback."""
    try:
        main(args)
    except (ValueError, OSError, FloatingPointError, DownloadError) as error:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {error}")


def add_sampling_flags(group) -> None:
    """Flags sample.py and sample_ddp.py share beyond the official ones."""
    group.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                       help="ddpm: ancestral (official); ddim; dpm++: DPM-Solver++(2M); unipc: UniPC (bh2, order 2)")
    group.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0: deterministic)")
    group.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                       help="guide only at timesteps t with LO <= t/1000 <= HI (1: pure noise), e.g. 0 0.7; "
                            "elsewhere one unguided forward (default: guide at every step)")
    group.add_argument("--weights", choices=["ema", "model"], default="ema", help="which weights of a train.py checkpoint")
    group.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    group.add_argument("--block", choices=BLOCK_DESIGNS, default=None,
                       help="block design (default: the checkpoint's, else read from its weights)")


def check_sampling_flags(args: argparse.Namespace, min_cfg_scale: float) -> None:
    """The shared sampling flags' ranges, checked before any work (flags are named in the error; the
    step count is checked where the respaced diffusion is built, sampling_diffusion)."""
    if args.eta < 0:
        raise ValueError(f"--eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like noise), got {args.eta}")
    if args.cfg_scale < min_cfg_scale:
        raise ValueError(f"--cfg-scale must be >= {min_cfg_scale} (1.0 turns guidance off), got {args.cfg_scale}")
    if args.cfg_interval is not None and not 0 <= args.cfg_interval[0] <= args.cfg_interval[1] <= 1:
        raise ValueError(f"--cfg-interval LO HI needs 0 <= LO <= HI <= 1 (fractions of the 1000 timesteps), "
                         f"got {' '.join(map(str, args.cfg_interval))}")


def resolve_device(choice: str) -> torch.device:
    """'auto' takes CUDA when present; 'cuda' without a GPU is an error, not a silent fallback."""
    if choice not in ("auto", "cuda", "cpu"):
        raise ValueError(f"--device must be auto, cuda or cpu, got {choice!r}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but PyTorch sees no CUDA device")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


@contextmanager
def distributed(device_choice: str) -> Iterator[tuple[int, int, torch.device]]:
    """Join the torchrun world (NCCL on CUDA, gloo on CPU), or make a world of one for plain python,
    for the body of a with-block; the process group is torn down however the body ends.

    Yields (rank, world_size, device); the device uses LOCAL_RANK, so multi-node runs work.
    """
    device = resolve_device(device_choice)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.get_rank(), dist.get_world_size(), device
    finally:
        dist.destroy_process_group()


def rank_zero_decides(rank: int, decide: Callable[[], T]) -> T:
    """decide() run on rank 0, its (picklable) result given to every rank; a ValueError or OSError it
    raises is raised on every rank, so none is left waiting in a collective for a rank that stopped."""
    outcome = [None, None]
    if rank == 0:
        try:
            outcome = [decide(), None]
        except (ValueError, OSError) as error:
            outcome = [None, error]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def forked_rng(device: torch.device):
    """A context in which the global CPU generator (and the device's, on CUDA) can be drawn from
    without the draws showing outside it: for building or running anything besides the trained DiT."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def require_positive(args: argparse.Namespace, *flags: str) -> None:
    """Each named integer flag that is set must be at least 1."""
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")


def create_logger(logging_dir: Optional[Union[str, Path]], rank: int) -> logging.Logger:
    """Rank 0 logs to the terminal and to logging_dir/log.txt; other ranks stay silent. The files of
    an earlier logger of this process are closed (close_logger)."""
    logger = logging.getLogger("DiT")
    close_logger(logger)
    logger.propagate = False
    if rank == 0:
        formatter = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        handlers = [logging.StreamHandler()]
        if logging_dir is not None:
            handlers.append(logging.FileHandler(Path(logging_dir) / "log.txt"))
        for handler in handlers:
            handler.setFormatter(formatter)
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    else:
        logger.addHandler(logging.NullHandler())
        logger.setLevel(logging.CRITICAL)
    return logger


def close_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


# ---- images ------------------------------------------------------------------------------------

def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM's crop: halve with BOX while the short side is >= 2x the target, BICUBIC-resize, centre crop."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size])


def load_rgb(path: str) -> Image.Image:
    """Open an image as 8-bit RGB as it is meant to be seen (to_rgb, after the EXIF orientation);
    a file that cannot be decoded is named in the error."""
    try:
        with open(path, "rb") as handle:
            return to_rgb(ImageOps.exif_transpose(Image.open(handle)))
    except Exception as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode PIL opens. 16-bit grey is scaled to 8 bits (PIL's convert would clip
    it, making mid-grey white); transparency is composited over white; palette, grey and CMYK
    images are converted by PIL. Floating-point images have no fixed range and are refused."""
    if image.mode in SIXTEEN_BIT_GREY:
        grey = np.asarray(image).astype(np.int64)
        if grey.min() < 0 or grey.max() > 65535:
            raise ValueError(f"a {image.mode} image with values outside 16 bits ({grey.min()}..{grey.max()})")
        image = Image.fromarray(((grey * 255 + 32767) // 65535).astype(np.uint8))
    elif image.mode == "F":
        raise ValueError("a floating-point (mode F) image has no fixed value range; save it with 8 or 16 bits")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "La", "PA", "RGBA", "RGBa") or (image.mode in ("L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def unreadable_images(paths: list, decode: bool) -> list:
    """'path (reason)' for every file that cannot be opened: the header only (decode=False: fast
    enough for every run's start), or the whole image (decode=True: train.py --check-data)."""
    def problem(path: str) -> Optional[str]:
        try:
            if decode:
                load_rgb(path)
            else:
                with Image.open(path):
                    pass
            return None
        except Exception as error:
            return f"{path} ({first_line(error.__cause__ or error).replace(f' {path!r}', '')})"

    with ThreadPoolExecutor(max_workers=8) as pool:  # file reads and PIL's decoders release the GIL
        return [found for found in pool.map(problem, paths) if found]


def image_folder(data_path: Optional[str], image_size: int):
    """ImageFolder of centre-cropped images in [-1, 1] (no flip: train.py flips per batch, seeded)."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    if not data_path:
        raise ValueError("--data-path is required (a folder with one sub-folder of images per class)")
    if not Path(data_path).is_dir():
        raise ValueError(f"--data-path {data_path} is not a folder")
    transform = transforms.Compose([
        transforms.Lambda(lambda pil_image: center_crop_arr(pil_image, image_size)),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], inplace=True),
    ])
    try:
        return ImageFolder(data_path, transform=transform, loader=load_rgb)
    except FileNotFoundError as error:
        raise ValueError(f"--data-path {data_path} holds no images in class sub-folders ({error})") from None


def check_image_path(path: Union[str, Path], flag: str) -> None:
    """An output path must name an image format PIL can write, by its extension."""
    Image.init()
    if Path(path).suffix.lower() not in Image.EXTENSION:
        raise ValueError(f"{flag} {path}: give a file name with an image extension such as .png or .jpg")


def save_image_grid(images: torch.Tensor, path: Union[str, Path], nrow: int) -> Path:
    """Images in [-1, 1] as one PNG grid, written to a temporary name and renamed."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as handle:
        save_image(images, handle, format=Image.registered_extensions()[path.suffix.lower()], nrow=nrow,
                   normalize=True, value_range=(-1, 1))
    return path


def to_uint8_images(samples: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, rounding as the official sample_ddp.py does."""
    return torch.clamp(127.5 * samples + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


# ---- the VAE -----------------------------------------------------------------------------------

def load_vae(choice: str, device: torch.device):
    """'ema'/'mse' (the hub VAEs), a local diffusers AutoencoderKL folder, or 'none' (pixel space)."""
    if choice == "none":
        return None
    from diffusers.models import AutoencoderKL

    source = HUB_VAES.get(choice, choice)
    if choice not in HUB_VAES and not Path(choice).is_dir():
        raise ValueError(f"--vae must be ema, mse, none or a local AutoencoderKL folder; {choice!r} is none of these")
    try:
        vae = AutoencoderKL.from_pretrained(source)
    except OSError as error:
        raise OSError(f"could not load the VAE {source!r} ({error}). Offline? Download it once with network "
                      f"access, or pass --vae /path/to/a/local/AutoencoderKL folder") from error
    return vae.to(device).eval().requires_grad_(False)


def latent_shape(vae, image_size: int) -> tuple[int, int]:
    """(channels, side) of what the DiT sees for images of image_size pixels."""
    if vae is None:
        return 3, image_size
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if image_size % factor:
        raise ValueError(f"--image-size {image_size} is not a multiple of {factor}, the VAE's downsampling factor")
    return vae.config.latent_channels, image_size // factor


def vae_scale(vae) -> float:
    """Latent scaling: the VAE's own config value (0.18215 for the SD VAEs DiT uses)."""
    return float(vae.config.scaling_factor)


@torch.no_grad()
def encode_posterior(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE's Gaussian posterior for images in [-1, 1]."""
    posterior = vae.encode(images).latent_dist
    return posterior.mean, posterior.std


def sample_latents(mean: torch.Tensor, std: torch.Tensor, scale: float) -> torch.Tensor:
    """One posterior draw, scaled: the same arithmetic and RNG use as diffusers' latent_dist.sample().

    Made contiguous because later draws (randn_like) follow the strides of their input.
    """
    return ((mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)) * scale).contiguous()


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents (or pixels when vae is None) -> images in roughly [-1, 1]."""
    if vae is None:
        return latents
    return vae.decode(latents / vae_scale(vae)).sample


# ---- pre-extracted latents (written by extract_features.py, read by train.py) ------------------

FEATURES_META = "meta.json"


def feature_shard_names(rank: int) -> tuple[str, str]:
    """(posterior file, label file) of one extraction process."""
    return f"posteriors_{rank:03d}.npy", f"labels_{rank:03d}.npy"


class LatentFeatures(torch.utils.data.Dataset):
    """VAE posteriors of a whole dataset: item i is ((unflipped, flipped) x (mean, std), label).

    Storing the posterior rather than one draw keeps training exactly as with on-the-fly encoding:
    train.py draws the latent from it every step, the same way diffusers does. Image i of the
    ImageFolder sits in shard i % num_shards, row i // num_shards, so indices (and thus the
    sampler's batches) are the ImageFolder's.
    """

    def __init__(self, feature_path: str):
        self.root = Path(feature_path)
        meta_file = self.root / FEATURES_META
        if not meta_file.is_file():
            raise ValueError(f"--feature-path {feature_path} has no {FEATURES_META}: run extract_features.py "
                             f"into it first (an interrupted extraction never writes this file)")
        self.meta = json.loads(meta_file.read_text())
        self.channels, self.latent_size = self.meta["channels"], self.meta["latent_size"]
        self.scale = self.meta["scale"]
        self.shards = self.meta["shards"]
        self._arrays = None  # memory maps are opened lazily, once per data-loader worker

    def check_matches(self, image_size: int, num_classes: int) -> None:
        if self.meta["image_size"] != image_size:
            raise ValueError(f"--feature-path {self.root} holds {self.meta['image_size']}px latents, "
                             f"but --image-size is {image_size}")
        if self.meta["num_classes"] > num_classes:
            raise ValueError(f"--feature-path {self.root} has {self.meta['num_classes']} classes, "
                             f"but --num-classes is {num_classes}")

    def __len__(self) -> int:
        return self.meta["num_images"]

    def __getitem__(self, index: int):
        if self._arrays is None:
            self._arrays = [(np.load(self.root / s["posteriors"], mmap_mode="r"), np.load(self.root / s["labels"]))
                            for s in self.shards]
        posteriors, labels = self._arrays[index % len(self.shards)]
        row = index // len(self.shards)
        return torch.from_numpy(np.array(posteriors[row])), int(labels[row])


# ---- models from checkpoints, and guided sampling (sample.py, sample_ddp.py) ----------------------

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
    size = f"--image-size {latent * 8} with a VAE (or {latent} with --vae none)" if channels == 4 else f"--image-size {latent} --vae none"
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
    has_pretrained = (resolved["model"], resolved["num_classes"]) == ("DiT-XL/2", 1000) and resolved["image_size"] in (256, 512)
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
    model = build_model(config, channels, latent_size, device)
    load_weights(model, state_dict, ckpt)
    model.eval()
    vae = load_vae(config["vae"], device) if with_vae else None
    if vae is not None and latent_shape(vae, config["image_size"]) != (channels, latent_size):
        raise ValueError(f"the VAE {config['vae']} gives latents {latent_shape(vae, config['image_size'])}, "
                         f"the model expects {(channels, latent_size)}")
    return model, vae, config


def guided_batch(noise: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg_scale: float, model,
                 guided: Optional[bool] = None, interval: Optional[tuple[float, float]] = None):
    """(x, model_fn, model_kwargs) for one sampling batch. Guided (by default when cfg_scale > 1, as
    sample_ddp.py decides; sample.py always guides): the batch is doubled with the null class (index
    num_classes) and model.forward_with_cfg combines the halves; with an interval only at the
    timesteps inside it (guided_in_interval). Otherwise plain model.forward."""
    if guided if guided is not None else cfg_scale > 1.0:
        x = torch.cat([noise, noise], 0)
        y = torch.cat([labels, torch.full_like(labels, num_classes)], 0)
        model_fn = model.forward_with_cfg if interval is None else guided_in_interval(model, *interval)
        return x, model_fn, dict(y=y, cfg_scale=cfg_scale)
    return noise, model.forward, dict(y=labels)


def guided_in_interval(model, low: float, high: float):
    """forward_with_cfg at timesteps t with low <= t/1000 <= high; elsewhere one unguided forward of
    the conditional half, copied to both halves (half the work). Guidance at the noisiest steps
    mostly narrows the variety of samples; there a plain forward is enough (Kynkaanniemi et al. 2024)."""
    def model_fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        if low <= float(t[0]) / 1000 <= high:  # every sampler calls the model with one timestep per batch
            return model.forward_with_cfg(x, t, y, cfg_scale)
        half = len(x) // 2
        out = model.forward(x[:half], t[:half], y[:half])
        return torch.cat([out, out], 0)
    return model_fn


# The samplers: the IDDPM loops of diffusion/ (ancestral: the official choice; DDIM), and two ODE
# solvers of diffusers that use the eps half of the model's output with DiT's own 1000 betas.
SAMPLERS = ("ddpm", "ddim", "dpm++", "unipc")
ODE_SOLVERS = ("dpm++", "unipc")


def sampling_diffusion(sampler: str, steps: int, flag: str = "--num-sampling-steps"):
    """What a sampler walks: the respaced diffusion (evenly strided steps for ddpm, DDIM's stride for
    ddim), or for an ODE solver its diffusers scheduler with DiT's betas and `steps` timesteps."""
    if steps < 2:  # the learned variance at the last step is interpolated towards the second step's
        raise ValueError(f"{flag} must be at least 2 for DiT's learned-variance sampling, got {steps}")
    if sampler in ODE_SOLVERS:
        return ode_scheduler(sampler, steps)
    try:
        return create_diffusion(f"ddim{steps}" if sampler == "ddim" else str(steps))
    except ValueError as error:
        raise ValueError(f"{flag} {steps}: {error}") from None


def ode_scheduler(sampler: str, steps: int):
    """DPM-Solver++(2M) (the variant diffusers' DiT documentation swaps in) or UniPC (bh2, order 2),
    timesteps spaced as diffusers does (linspace from 999), the last step to noise level zero."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    betas = create_diffusion("").betas.tolist()  # DiT's linear schedule, exactly
    common = dict(num_train_timesteps=len(betas), trained_betas=betas, prediction_type="epsilon", solver_order=2)
    if sampler == "dpm++":
        scheduler = DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", final_sigmas_type="zero")
    elif sampler == "unipc":
        scheduler = UniPCMultistepScheduler(**common, solver_type="bh2", final_sigmas_type="zero")
    else:
        raise ValueError(f"--sampler {sampler!r} is not an ODE solver ({', '.join(ODE_SOLVERS)})")
    scheduler.set_timesteps(steps)
    return scheduler


def run_sampler(diffusion, sampler: str, model_fn, x: torch.Tensor, model_kwargs: dict, eta: float = 0.0,
                progress: bool = False, pixels: bool = False) -> torch.Tensor:
    """Sample with `diffusion` (from sampling_diffusion). Latents are not clipped (as in DiT);
    pixel-space predictions of x_0 are clipped to [-1, 1], as pixel diffusion models do."""
    common = dict(clip_denoised=pixels, model_kwargs=model_kwargs, progress=progress, device=x.device)
    if sampler == "ddpm":
        return diffusion.p_sample_loop(model_fn, x.shape, x, **common)
    if sampler == "ddim":
        return diffusion.ddim_sample_loop(model_fn, x.shape, x, eta=eta, **common)
    if sampler in ODE_SOLVERS:
        return solve_ode(diffusion, model_fn, x, model_kwargs, progress, pixels)
    raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")


def solve_ode(scheduler, model_fn, x: torch.Tensor, model_kwargs: dict, progress: bool = False,
              pixels: bool = False) -> torch.Tensor:
    """The diffusers sampling loop: eps from the model's first C channels at each of the
    scheduler's timesteps, one solver step each. Draws no random numbers."""
    from tqdm.auto import tqdm

    scheduler.set_timesteps(scheduler.num_inference_steps, device=x.device)  # also clears the solver's history
    alphas_cumprod = scheduler.alphas_cumprod.to(x.device, torch.float64)
    x = x * scheduler.init_noise_sigma
    for t in tqdm(scheduler.timesteps, disable=not progress):
        eps = model_fn(x, torch.full((len(x),), int(t), device=x.device, dtype=torch.long), **model_kwargs)
        eps = eps[:, :x.shape[1]].float()
        if pixels:  # clip the predicted x_0 and give the solver the eps that matches it
            a = alphas_cumprod[int(t)]
            x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
            eps = ((x - a.sqrt() * x0) / (1 - a).sqrt()).float()
        x = scheduler.step(eps, t, x).prev_sample
    return x
