"""Pretrained DiT checkpoints: find_model() for names or paths, download_model() for the official
files (both live in ditlib.pretrained; here for users' code, as in the official release).

    python download.py   # fetch DiT-XL-2-256x256.pt and DiT-XL-2-512x512.pt into pretrained_models/

(SiT's SiT-XL-2-256x256.pt, a name find_model also takes, is fetched on first use.)

Set DIT_MODELS_URL to use a mirror of https://dl.fbaipublicfiles.com/DiT/models.
"""
import sys

from ditlib.pretrained import PRETRAINED_MODELS, download_model, find_model
from ditlib.remote_files import DownloadError

__all__ = ["find_model", "download_model"]


if __name__ == "__main__":
    for model_name in sorted(name for name in PRETRAINED_MODELS if name.startswith("DiT-")):
        try:
            print(f"{model_name}: {download_model(model_name)}")
        except DownloadError as error:
            sys.exit(f"download.py: error: {error}")
