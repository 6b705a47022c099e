"""The released checkpoints: DiT's two (DIT_MODELS_URL sets a mirror of
https://dl.fbaipublicfiles.com/DiT/models) and SiT's SiT-XL/2 (SIT_MODELS_URL sets a mirror of the
folder holding SiT-XL-2-256x256.pt), and the official find_model() and download_model() that
download.py offers users."""
import os
from pathlib import Path
from typing import Union

from ditlib.checkpoints import load_state_dict
from ditlib.remote_files import DownloadError, download_file

PRETRAINED_MODELS = {"DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt", "SiT-XL-2-256x256.pt"}
DEFAULT_MODELS_URL = "https://dl.fbaipublicfiles.com/DiT/models"
# Where SiT's download.py fetches its released SiT-XL/2 (256px, 8 output channels, 1,001 label rows).
SIT_XL_URL = ("https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/SiT-XL-2-256.pt"
              "?rlkey=uxzxmpicu46coq3msb17b9ofa&dl=0")
PRETRAINED_DIR = Path("pretrained_models")
DIT_KEYS = ("pos_embed", "x_embedder.proj.weight", "t_embedder.mlp.0.weight", "final_layer.linear.weight")


def find_model(name_or_path: Union[str, Path], weights: str = "ema") -> dict:
    """A DiT state dict: an official name (downloaded on first use), a train.py checkpoint (ours or the
    official script's: its `weights` entry, "ema" by default, as the official code does), a bare
    state dict, or a .safetensors file."""
    if str(name_or_path) in PRETRAINED_MODELS:
        return load_state_dict(download_model(str(name_or_path)))
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (and it is not one of the official names: "
                                f"{', '.join(sorted(PRETRAINED_MODELS))})")
    return load_state_dict(path, weights)


def models_url() -> str:
    return os.environ.get("DIT_MODELS_URL", DEFAULT_MODELS_URL).rstrip("/")


def model_url(name: str) -> str:
    """Where a released checkpoint is fetched from (a mirror when its variable is set)."""
    if name.startswith("SiT-"):
        mirror = os.environ.get("SIT_MODELS_URL")
        return f"{mirror.rstrip('/')}/{name}" if mirror else SIT_XL_URL
    return f"{models_url()}/{name}"


def download_model(name: str, directory: Path = PRETRAINED_DIR) -> Path:
    """Path of an official checkpoint, fetching it first if it is not there yet.

    The official files are 2.7 GB: a cut download continues where it stopped on the next call
    (download_file), and the file appears under its name only once complete and checked (non-empty,
    loads, has DiT's keys).
    """
    if name not in PRETRAINED_MODELS:
        raise ValueError(f"{name!r} is not an official checkpoint: {', '.join(sorted(PRETRAINED_MODELS))}")
    directory = Path(directory)
    target = directory / name
    if target.is_file():
        return target
    created = not directory.exists()
    try:
        return download_file(model_url(name), target, check=check_checkpoint)
    except DownloadError as error:
        if created and not any(directory.iterdir()):  # leave no empty folder behind
            directory.rmdir()
        variable = "SIT_MODELS_URL" if name.startswith("SiT-") else "DIT_MODELS_URL"
        raise DownloadError(f"{error} (or set {variable} to a mirror)") from error.__cause__


def check_checkpoint(path: Path) -> None:
    state_dict = load_state_dict(path)
    missing = [key for key in DIT_KEYS if key not in state_dict]
    if missing:
        raise ValueError(f"the downloaded file is not a DiT checkpoint (no {', '.join(missing)})")
