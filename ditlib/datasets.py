"""The training data: an image folder encoded by the VAE on the fly, or latents stored by
extract_features.py, and what the DiT sees of them (channels, grid size, latent scale)."""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ditlib.errors import SettingError
from ditlib.images import image_folder, unreadable_images
from ditlib.latents import LatentFeatures, latent_shape, load_vae, vae_scale


@dataclass(frozen=True)
class DataSource:
    """Where the training data comes from (the fields are train.py's flags)."""
    data_path: Optional[str] = None
    feature_path: Optional[str] = None
    image_size: int = 256
    num_classes: int = 1000
    vae: str = "ema"
    check_data: bool = False
    global_batch_size: int = 256


@dataclass
class TrainingData:
    """The dataset and what the DiT sees of it."""
    dataset: torch.utils.data.Dataset
    vae: Optional[torch.nn.Module]  # None: pixel space, or latents without sample grids
    vae_name: str  # the VAE that made the latents, recorded in checkpoints
    scale: float  # latent scaling factor (1 in pixel space)
    channels: int
    latent_size: int
    stored_latents: bool  # items are (unflipped, flipped) x (mean, std) of the VAE posterior


def load_data(source: DataSource, decodes: bool, rank: int, world_size: int,
              device: torch.device) -> Optional[TrainingData]:
    """The dataset (images or latents) and the VAE (for stored latents only if the run `decodes`
    samples); None after check_data has checked every image."""
    if source.feature_path is not None:
        dataset = LatentFeatures(source.feature_path)
        dataset.check_matches(source.image_size, source.num_classes)
        vae = dataset.load_vae(device) if decodes else None
        data = TrainingData(dataset, vae, dataset.meta["vae"], dataset.scale, dataset.channels, dataset.latent_size,
                            stored_latents=True)
    else:
        dataset = image_folder(source.data_path, source.image_size)
        check_image_files([path for path, _ in dataset.samples], source.check_data, rank, world_size)
        if source.check_data:
            if rank == 0:
                print(f"--check-data: all {len(dataset):,} images under {source.data_path} decode")
            return None
        if len(dataset.classes) > source.num_classes:
            raise SettingError("data_path", f"has {len(dataset.classes)} class folders but --num-classes is "
                                            f"{source.num_classes}")
        vae = load_vae(source.vae, device)
        data = TrainingData(dataset, vae, source.vae, vae_scale(vae) if vae is not None else 1.0,
                            *latent_shape(vae, source.image_size), stored_latents=False)
    if len(dataset) < source.global_batch_size:
        raise ValueError(f"the dataset has {len(dataset)} images, fewer than one global batch of "
                         f"{source.global_batch_size}")
    return data


def check_image_files(paths: list, decode: bool, rank: int, world_size: int) -> None:
    """Every rank opens its share of the image files (headers only, or in full with decode); any
    unreadable one stops every rank with one line naming them all, before training starts."""
    found = [None] * world_size
    dist.all_gather_object(found, unreadable_images(paths[rank::world_size], decode))
    bad = sorted(name for part in found for name in part)
    if bad:
        raise ValueError(f"{len(bad)} of the {len(paths):,} images under --data-path cannot be read: "
                         f"{'; '.join(bad)}")
