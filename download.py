"""Pretrained DiT checkpoints: find_model() for names or paths, download_model() for the official files.

    python download.py        # fetch DiT-XL-2-256x256.pt and DiT-XL-2-512x512.pt into pretrained_models/

Set DIT_MODELS_URL to use a mirror of https://dl.fbaipublicfiles.com/DiT/models.
"""
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Union

import torch

PRETRAINED_MODELS = {"DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt"}
DEFAULT_MODELS_URL = "https://dl.fbaipublicfiles.com/DiT/models"
PRETRAINED_DIR = Path("pretrained_models")
DIT_KEYS = ("pos_embed", "x_embedder.proj.weight", "t_embedder.mlp.0.weight", "final_layer.linear.weight")


class DownloadError(RuntimeError):
    """A pretrained file could not be fetched; the message says where to put it by hand."""


def find_model(name_or_path: Union[str, Path], weights: str = "ema") -> dict:
    """A DiT state dict: an official name (downloaded on first use), a train.py checkpoint (its `weights`
    entry, "ema" by default, as the official code does), a bare state dict, or a .safetensors file."""
    if str(name_or_path) in PRETRAINED_MODELS:
        return load_state_dict(download_model(str(name_or_path)))
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (and it is not one of the official names: "
                                f"{', '.join(sorted(PRETRAINED_MODELS))})")
    return load_state_dict(path, weights)


def load_state_dict(path: Path, weights: str = "ema") -> dict:
    """Read a checkpoint safely (weights_only); unwrap train.py checkpoints."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict or a train.py checkpoint")
    if "model" in checkpoint and isinstance(checkpoint["model"], dict):  # a train.py checkpoint
        if weights not in checkpoint:
            raise ValueError(f"{path} is a training checkpoint without {weights!r} weights")
        return checkpoint[weights]
    return checkpoint


def models_url() -> str:
    return os.environ.get("DIT_MODELS_URL", DEFAULT_MODELS_URL).rstrip("/")


def download_model(name: str, directory: Path = PRETRAINED_DIR) -> Path:
    """Path of an official checkpoint, fetching it first if it is not there yet.

    The file is streamed to a temporary name, checked (non-empty, complete, loads, has DiT's keys)
    and only then renamed, so an interrupted or bad download never leaves a file under the final name.
    """
    if name not in PRETRAINED_MODELS:
        raise ValueError(f"{name!r} is not an official checkpoint: {', '.join(sorted(PRETRAINED_MODELS))}")
    directory = Path(directory)
    target = directory / name
    if target.is_file():
        return target
    url = f"{models_url()}/{name}"
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".part")
    tmp = Path(tmp_name)
    retry = (f"Retry later, set DIT_MODELS_URL to a mirror, or download {url} yourself and place it at "
             f"{target.resolve()}")
    try:
        with os.fdopen(fd, "wb") as handle:
            fetch(url, handle)
        check_checkpoint(tmp)
        os.replace(tmp, target)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
        raise DownloadError(f"could not download {url}: {error}. {retry}") from error
    finally:
        tmp.unlink(missing_ok=True)
    return target


def fetch(url: str, handle) -> None:
    """Stream url into an open file with a progress bar; a short read is an error."""
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=60) as response:
        expected = int(response.headers.get("Content-Length") or 0) or None
        received = 0
        with tqdm(total=expected, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1], disable=None) as bar:
            while chunk := response.read(1 << 20):
                handle.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if received == 0:
        raise ValueError("the server sent an empty file")
    if expected is not None and received != expected:
        raise ValueError(f"the connection ended after {received} of {expected} bytes")


def check_checkpoint(path: Path) -> None:
    state_dict = load_state_dict(path)
    missing = [key for key in DIT_KEYS if key not in state_dict]
    if missing:
        raise ValueError(f"the downloaded file is not a DiT checkpoint (no {', '.join(missing)})")


if __name__ == "__main__":
    for model_name in sorted(PRETRAINED_MODELS):
        try:
            print(f"{model_name}: {download_model(model_name)}")
        except DownloadError as error:
            sys.exit(f"download.py: error: {error}")
