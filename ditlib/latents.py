"""The VAE and latents: loading the VAE, encoding and decoding, and the stored posteriors
extract_features.py writes and train.py --feature-path reads."""
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ditlib.errors import SettingError
from ditlib.files import file_digest

# The Stable Diffusion VAEs DiT was trained with, by their short names.
HUB_VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


def load_vae(choice: str, device: torch.device):
    """'ema'/'mse' (the hub VAEs), a local diffusers AutoencoderKL folder, or 'none' (pixel space)."""
    if choice == "none":
        return None
    from diffusers.models import AutoencoderKL

    source = HUB_VAES.get(choice, choice)
    if choice not in HUB_VAES and not Path(choice).is_dir():
        raise SettingError("vae", f"must be ema, mse, none or a local AutoencoderKL folder; {choice!r} is none of "
                                  f"these")
    try:
        vae = AutoencoderKL.from_pretrained(source)
    except OSError as error:
        raise OSError(f"could not load the VAE {source!r} ({error}). Offline? Download it once with network "
                      f"access, or pass --vae /path/to/a/local/AutoencoderKL folder") from error
    return vae.to(device).eval().requires_grad_(False)


def vae_identity(choice: str) -> dict:
    """What names a VAE for good, for extract_features.py's meta.json: the short hub name, or a local
    folder's absolute path and a hash of its files (a relative path breaks from another directory,
    and another folder of the same name would be used silently)."""
    if choice in HUB_VAES or choice == "none":
        return {"vae": choice}
    folder = Path(choice).resolve()
    return {"vae": str(folder), "vae_sha256": folder_digest(folder)}


def folder_digest(folder: Path) -> str:
    """SHA-256 over a folder's file names and contents, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + file_digest(path).encode())
    return digest.hexdigest()


def latent_shape(vae, image_size: int) -> tuple[int, int]:
    """(channels, side) of what the DiT sees for images of image_size pixels."""
    if vae is None:
        return 3, image_size
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if image_size % factor:
        raise SettingError("image_size", f"{image_size} is not a multiple of {factor}, the VAE's downsampling factor")
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


FEATURES_META = "meta.json"


# How posteriors can be stored on disk: numpy has no bfloat16, so its bits are kept as uint16.
STORED_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def to_stored(values: torch.Tensor, dtype: str) -> np.ndarray:
    """A tensor as the numpy array stored for `dtype` (rounded to nearest)."""
    if dtype == "bfloat16":
        return values.to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)
    return values.float().cpu().numpy().astype(STORED_DTYPES[dtype])


def from_stored(array: np.ndarray, dtype: str) -> torch.Tensor:
    """The float32 tensor of a stored array (exact: each stored value is a float32 value)."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.array(array).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.array(array, dtype=np.float32))


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
            raise SettingError("feature_path", f"{feature_path} has no {FEATURES_META}: run extract_features.py "
                                               f"into it first (an interrupted extraction never writes this file)")
        self.meta = json.loads(meta_file.read_text())
        self.channels, self.latent_size = self.meta["channels"], self.meta["latent_size"]
        self.scale = self.meta["scale"]
        self.shards = self.meta["shards"]
        self._arrays = None  # memory maps are opened lazily, once per data-loader worker

    def load_vae(self, device: torch.device):
        """The VAE that made these latents (sample grids decode with it), checked to be the same one."""
        vae, expected = self.meta["vae"], self.meta.get("vae_sha256")
        if expected is not None:
            if not Path(vae).is_dir():
                raise SettingError("feature_path", f"{self.root}: its latents were made by the VAE in {vae}, which "
                                                   f"is gone; put it back, or train without sample grids "
                                                   f"(--sample-every 0)")
            if folder_digest(Path(vae)) != expected:
                raise SettingError("feature_path", f"{self.root}: the VAE folder {vae} has changed since the "
                                                   f"latents were made (its files' hash differs); restore it, or "
                                                   f"extract the latents again")
        return load_vae(vae, device)

    def check_matches(self, image_size: int, num_classes: int) -> None:
        if self.meta["image_size"] != image_size:
            raise SettingError("feature_path", f"{self.root} holds {self.meta['image_size']}px latents, "
                                               f"but --image-size is {image_size}")
        if self.meta["num_classes"] > num_classes:
            raise SettingError("feature_path", f"{self.root} has {self.meta['num_classes']} classes, "
                                               f"but --num-classes is {num_classes}")

    def __len__(self) -> int:
        return self.meta["num_images"]

    def __getitem__(self, index: int):
        if self._arrays is None:
            self._arrays = [(np.load(self.root / s["posteriors"], mmap_mode="r"), np.load(self.root / s["labels"]))
                            for s in self.shards]
        posteriors, labels = self._arrays[index % len(self.shards)]
        row = index // len(self.shards)
        return from_stored(posteriors[row], self.meta.get("dtype", "float32")), int(labels[row])
