"""What train.py, extract_features.py and the sampling scripts share: processes, data, VAE, files."""
import json
import logging
import os
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

# The Stable Diffusion VAEs DiT was trained with, by their short names.
HUB_VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


# ---- processes ---------------------------------------------------------------------------------

def resolve_device(choice: str) -> torch.device:
    """'auto' takes CUDA when present; 'cuda' without a GPU is an error, not a silent fallback."""
    if choice not in ("auto", "cuda", "cpu"):
        raise ValueError(f"--device must be auto, cuda or cpu, got {choice!r}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but PyTorch sees no CUDA device")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def setup_distributed(device_choice: str) -> tuple[int, int, torch.device]:
    """Join the torchrun world (NCCL on CUDA, gloo on CPU), or make a world of one for plain python.

    Returns (rank, world_size, device); the device uses LOCAL_RANK, so multi-node runs work.
    """
    device = resolve_device(device_choice)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def create_logger(logging_dir: Optional[Union[str, Path]], rank: int) -> logging.Logger:
    """Rank 0 logs to the terminal and to logging_dir/log.txt; other ranks stay silent."""
    logger = logging.getLogger("DiT")
    logger.handlers.clear()
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


# ---- files -------------------------------------------------------------------------------------

def atomic_torch_save(obj, path: Union[str, Path]) -> None:
    """torch.save to a temporary file in the same folder, then rename: a kill never leaves half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    """Open an image as RGB; a file that cannot be decoded is named in the error."""
    try:
        with open(path, "rb") as handle:
            return Image.open(handle).convert("RGB")
    except Exception as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


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
