"""Pretrained DiT checkpoints: find_model() for names or paths, download_model() for the official files.

    python download.py        # fetch DiT-XL-2-256x256.pt and DiT-XL-2-512x512.pt into pretrained_models/

Set DIT_MODELS_URL to use a mirror of https://dl.fbaipublicfiles.com/DiT/models.
"""
import argparse
import http.client
import os
import pickle
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Union

import torch

from files import atomic_write

PRETRAINED_MODELS = {"DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt"}
DEFAULT_MODELS_URL = "https://dl.fbaipublicfiles.com/DiT/models"
PRETRAINED_DIR = Path("pretrained_models")
DIT_KEYS = ("pos_embed", "x_embedder.proj.weight", "t_embedder.mlp.0.weight", "final_layer.linear.weight")


class DownloadError(RuntimeError):
    """A pretrained file could not be fetched; the message says where to put it by hand."""


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


def load_state_dict(path: Path, weights: str = "ema") -> dict:
    """The DiT weights in a checkpoint file, read safely (see read_checkpoint)."""
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(path)
    return weights_in(read_checkpoint(path), path, weights)


# The official train.py saves its command line as an argparse.Namespace; no other class is unpickled.
CHECKPOINT_GLOBALS = [argparse.Namespace]


def read_checkpoint(path: Union[str, Path]):
    """torch.load with weights_only=True, allowing argparse.Namespace and nothing else, so official
    train.py checkpoints load while pickled code is never run. A file that needs any other global
    is refused with a one-line error that names it and says how to convert a trusted file."""
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        foreign = [name for name in unsafe_globals(path, error) if name != "argparse.Namespace"]
        if not foreign:
            raise ValueError(f"{path} is not a readable PyTorch checkpoint ({first_line(error)})") from None
        raise ValueError(
            f"{path} needs the Python global(s) {', '.join(foreign)} to load, which a checkpoint of weights does not; "
            f"loading it would run code from the file, so it is refused. If you trust the file, convert it once: "
            f"python -c \"import torch; c = torch.load('{path}', weights_only=False); "
            f"c = c.state_dict() if hasattr(c, 'state_dict') else {{k: c[k] for k in ('model', 'ema') if k in c}}; "
            f"torch.save(c, 'converted.pt')\"") from None
    except Exception as error:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: "
                         f"{first_line(error)})") from None


def unsafe_globals(path: Union[str, Path], error: Exception) -> list:
    """The globals (module.name) a checkpoint would import, without unpickling it."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint: read the name from the unpickler's own message
        marker = "Unsupported global: GLOBAL "
        text = str(error)
        return [text.split(marker, 1)[1].split()[0]] if marker in text else []


def first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def checkpoint_args(checkpoint) -> dict:
    """A train.py checkpoint's saved command line as a dict: ours store a dict, the official script
    an argparse.Namespace; anything else (a bare state dict) has none."""
    if not isinstance(checkpoint, dict):
        return {}
    args = checkpoint.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return args if isinstance(args, dict) else {}


def weights_in(checkpoint, path: Union[str, Path], weights: str = "ema") -> dict:
    """The state dict a loaded checkpoint holds: train.py checkpoints (ours and the official
    script's, recognised by their "ema" entry as the official find_model does) give `weights`."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict or a train.py checkpoint")
    if isinstance(checkpoint.get("ema"), dict) or isinstance(checkpoint.get("model"), dict):  # a train.py checkpoint
        if not isinstance(checkpoint.get(weights), dict):
            raise ValueError(f"{path} is a training checkpoint without {weights!r} weights")
        return checkpoint[weights]
    return checkpoint


def models_url() -> str:
    return os.environ.get("DIT_MODELS_URL", DEFAULT_MODELS_URL).rstrip("/")


def download_model(name: str, directory: Path = PRETRAINED_DIR) -> Path:
    """Path of an official checkpoint, fetching it first if it is not there yet.

    The file is streamed to a temporary name, checked (non-empty, complete, loads, has DiT's keys)
    and only then renamed (files.atomic_write), so an interrupted or bad download never leaves a
    file under the final name.
    """
    if name not in PRETRAINED_MODELS:
        raise ValueError(f"{name!r} is not an official checkpoint: {', '.join(sorted(PRETRAINED_MODELS))}")
    directory = Path(directory)
    target = directory / name
    if target.is_file():
        return target
    url = f"{models_url()}/{name}"
    directory.mkdir(parents=True, exist_ok=True)
    retry = (f"Retry later, set DIT_MODELS_URL to a mirror, or download {url} yourself and place it at "
             f"{target.resolve()}")
    try:
        with atomic_write(target) as handle:  # the file appears under its name only once complete and checked
            fetch(url, handle)
            handle.flush()
            check_checkpoint(Path(handle.name))
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
        raise DownloadError(f"could not download {url}: {error}. {retry}") from error
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
