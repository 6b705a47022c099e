"""Fixtures: what several test files build once (an image folder, a tiny VAE, a trained checkpoint,
torch-fidelity's network with random weights). Plain helpers live in helpers.py."""
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DEVICE, fid_network_path, make_image_folder, mnist_digits, run_main

from ditlib import metrics


@pytest.fixture
def image_folder_path(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture(scope="session")
def tiny_vae_path(tmp_path_factory) -> Path:
    """A real diffusers AutoencoderKL (8x downsampling, 4 latent channels), saved with save_pretrained."""
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


@pytest.fixture(scope="session")
def fidelity_inception_path(tmp_path_factory) -> Path:
    """torch-fidelity's own Inception-v3 class with random weights, saved as the .pth it loads (the
    real weights need the internet). Building it draws from the global generator, as the real one does."""
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


@pytest.fixture(scope="session")
def network():
    return metrics.InceptionNetwork(str(fid_network_path()))


@pytest.fixture(scope="session")
def sets(tmp_path_factory) -> dict:
    """Image npz files: two disjoint random halves of real MNIST, uniform noise, all 0s, all 1s."""
    digits, labels = mnist_digits()
    order = np.random.default_rng(0).permutation(len(digits))
    arrays = {
        "half_a": digits[order[:PER_SET]],
        "half_b": digits[order[PER_SET: 2 * PER_SET]],
        "noise": np.random.default_rng(1).integers(0, 256, (PER_SET, 28, 28), dtype=np.uint8),
        "zeros": digits[labels == 0][:PER_SET],
        "ones": digits[labels == 1][:PER_SET],
    }
    root = tmp_path_factory.mktemp("sets")
    for name, images in arrays.items():
        np.savez(root / f"{name}.npz", arr_0=images)
    return {name: root / f"{name}.npz" for name in arrays}


@pytest.fixture(scope="session")
def features(network, sets) -> dict:
    return {name: metrics.extract(network, str(path), progress=False) for name, path in sets.items()}


PER_SET = 40  # Inception-v3 at 299x299 costs 0.2 s an image on a small CPU
