"""download.py: the official find_model() and download_model() for users' code, and the command that
fetches both official checkpoints (from a loopback server standing in for the official URL)."""
import os
import subprocess
import sys

import torch
from helpers import ROOT, LoopbackServer

import download
from ditlib import pretrained
from models import DiT_models


def test_the_official_functions_are_the_librarys():
    assert download.find_model is pretrained.find_model and download.download_model is pretrained.download_model


def test_the_command_fetches_both_official_checkpoints_or_says_why_not(tmp_path):
    torch.save(DiT_models["DiT-Nano/4"](input_size=8, num_classes=3).state_dict(), tmp_path / "ok.pt")
    body = (tmp_path / "ok.pt").read_bytes()
    server = LoopbackServer()
    env = {**os.environ, "DIT_MODELS_URL": server.url, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "download.py")]
    try:
        server.routes["/models/DiT-XL-2-256x256.pt"] = (200, body, None)
        failed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert failed.returncode != 0 and "Traceback" not in failed.stderr
        assert failed.stderr.startswith("download.py: error: could not download")
        assert "DiT-XL-2-512x512.pt" in failed.stderr
        server.routes["/models/DiT-XL-2-512x512.pt"] = (200, body, None)
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    finally:
        server.close()
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{name}: pretrained_models/{name}"
                                        for name in ("DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt")]
    assert all((tmp_path / "pretrained_models" / name).read_bytes() == body
               for name in ("DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt"))
