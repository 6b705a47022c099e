"""Pretrained DiT checkpoints: find_model() for names or paths, download_model() for the official files.

    python download.py        # fetch DiT-XL-2-256x256.pt and DiT-XL-2-512x512.pt into pretrained_models/

Set DIT_MODELS_URL to use a mirror of https://dl.fbaipublicfiles.com/DiT/models.
"""
import http.client
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional, Union

from checkpoints import load_state_dict
from files import file_digest

PRETRAINED_MODELS = {"DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt"}
DEFAULT_MODELS_URL = "https://dl.fbaipublicfiles.com/DiT/models"
PRETRAINED_DIR = Path("pretrained_models")
DIT_KEYS = ("pos_embed", "x_embedder.proj.weight", "t_embedder.mlp.0.weight", "final_layer.linear.weight")


class DownloadError(ConnectionError):
    """A pretrained file could not be fetched; the message says where to put it by hand (an OSError,
    so the scripts print it as one line)."""


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
        return download_file(f"{models_url()}/{name}", target, check=check_checkpoint)
    except DownloadError as error:
        if created and not any(directory.iterdir()):  # leave no empty folder behind
            directory.rmdir()
        raise DownloadError(f"{error} (or set DIT_MODELS_URL to a mirror)") from error.__cause__


def copy_response(response, handle, url: str) -> None:
    """An HTTP response's body into an open file with a progress bar; an empty or short body is an error."""
    from tqdm import tqdm

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


def download_file(url: str, target: Path, sha256: Optional[str] = None,
                  check: Optional[Callable[[Path], None]] = None) -> Path:
    """A large file (a checkpoint, ADM's reference batches) fetched to target: resumable (a cut download
    continues from its .part file with an HTTP range request), checked against sha256 and by check (a
    ValueError names the problem) when given, and renamed into place only when complete and checked; a
    complete file that fails a check is deleted. Returns target; a file already there is kept."""
    target = Path(target)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f".{target.name}.part")
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response, \
                open(part, "ab" if response.status == 206 else "wb") as handle:  # 206: the server resumed
            try:
                copy_response(response, handle, url)
            finally:  # what arrived is kept for the next try
                handle.flush()
                os.fsync(handle.fileno())
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
        raise DownloadError(f"could not download {url}: {error}. Rerun later (a cut download continues "
                            f"where it stopped), or place the file at {target.resolve()} yourself") from error
    try:
        if sha256 is not None and file_digest(part) != sha256:
            raise ValueError(f"it does not have the expected SHA-256 {sha256}")
        if check is not None:
            check(part)
    except ValueError as error:
        part.unlink()
        raise DownloadError(f"{url} was downloaded but {error}; the download was deleted. Place a good copy "
                            f"at {target.resolve()} yourself") from error
    os.replace(part, target)
    return target


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
