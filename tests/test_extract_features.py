"""extract_features.py: latents stored once give the same training as on-the-fly encoding, name their
VAE for good, and keep a finished set."""
import json
import re

import numpy as np
import pytest
import torch
from helpers import DDP_DEVICE, DEVICE, latent_args, load, only_experiment, read_metrics, run_main, run_script


def test_extracted_latents_give_the_same_losses_as_on_the_fly_encoding(tmp_path, image_folder_path, tiny_vae_path):
    run_script("extract_features.py", "--data-path", image_folder_path, "--features-path", tmp_path / "features",
               "--image-size", "32", "--vae", tiny_vae_path, "--batch-size", "3", "--num-workers", "0",
               "--device", DDP_DEVICE, nproc=2)
    meta = json.loads((tmp_path / "features" / "meta.json").read_text())
    assert meta["num_images"] == 16 and [s["count"] for s in meta["shards"]] == [8, 8]
    common = ["--global-batch-size", "4", "--max-steps", "5", "--log-every", "1", "--ckpt-every", "100",
              *latent_args(tiny_vae_path)]
    run_main("train.py", *common, "--data-path", image_folder_path, "--results-dir", tmp_path / "fly")
    # Sample grids from features decode with the VAE recorded in meta.json, whatever --vae says.
    run_main("train.py", *common, "--feature-path", tmp_path / "features", "--results-dir", tmp_path / "pre",
             "--vae", "none", "--sample-every", "5", "--sample-steps", "2", "--sample-grid-size", "4")
    on_the_fly = [r["loss"] for r in read_metrics(only_experiment(tmp_path / "fly"))]
    pre_extracted = [r["loss"] for r in read_metrics(only_experiment(tmp_path / "pre"))]
    assert len(on_the_fly) == 5
    assert on_the_fly == pytest.approx(pre_extracted, rel=1e-5, abs=1e-6)
    from PIL import Image
    grid = only_experiment(tmp_path / "pre") / "samples" / "0000005.png"
    assert Image.open(grid).size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)  # decoded 32px images, not 4x4 latents
    checkpoint = load(next((only_experiment(tmp_path / "pre") / "checkpoints").iterdir()))
    assert checkpoint["args"]["vae"] == str(tiny_vae_path)  # so sample.py rebuilds the right geometry
    with pytest.raises(ValueError, match="holds 32px latents, but --image-size is 64"):
        run_main("train.py", *common, "--feature-path", tmp_path / "features", "--results-dir", tmp_path / "bad",
                 "--image-size", "64")
    with pytest.raises(ValueError, match="--vae none has no latents to extract"):
        run_main("extract_features.py", "--data-path", image_folder_path, "--features-path", tmp_path / "f2",
                 "--vae", "none")


def test_compact_latents_differ_from_float32_only_by_the_stored_rounding(tmp_path, image_folder_path, tiny_vae_path):
    import shutil

    extract = ["--data-path", image_folder_path, "--image-size", "32", "--vae", tiny_vae_path, "--batch-size", "8",
               "--num-workers", "0", "--device", DEVICE]
    for dtype in ("float32", "float16", "bfloat16"):
        run_main("extract_features.py", *extract, "--features-path", tmp_path / dtype, "--dtype", dtype)
    full, half = (tmp_path / d / "posteriors_000.npy" for d in ("float32", "float16"))
    assert half.stat().st_size < 0.52 * full.stat().st_size
    train = ["--global-batch-size", "4", "--max-steps", "3", "--log-every", "1", "--ckpt-every", "100",
             *latent_args(tiny_vae_path)]
    for dtype, rounding in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        # float32 features rounded as the compact file rounds them: training must see exactly the same.
        rounded = tmp_path / f"rounded-{dtype}"
        shutil.copytree(tmp_path / "float32", rounded)
        values = torch.from_numpy(np.load(rounded / "posteriors_000.npy"))
        np.save(rounded / "posteriors_000.npy", values.to(rounding).float().numpy())
        losses = {}
        for name in (dtype, f"rounded-{dtype}"):
            run_main("train.py", *train, "--feature-path", tmp_path / name, "--results-dir", tmp_path / f"run-{name}")
            losses[name] = [r["loss"] for r in read_metrics(only_experiment(tmp_path / f"run-{name}"))]
        assert losses[dtype] == losses[f"rounded-{dtype}"] and len(losses[dtype]) == 3


def test_latents_name_their_vae_for_good_and_a_finished_set_is_kept(tmp_path, image_folder_path, tiny_vae_path,
                                                                     monkeypatch):
    """A relative --vae is stored as an absolute path with a hash of the folder, so training from another
    directory finds it and a different folder of that name is refused; a finished set is not replaced
    without --overwrite (before, its meta.json was deleted first)."""
    import shutil

    from ditlib.latents import folder_digest
    shutil.copytree(tiny_vae_path, tmp_path / "vae")
    monkeypatch.chdir(tmp_path)
    extract = ["--data-path", image_folder_path, "--image-size", "32", "--vae", "vae", "--num-workers", "0",
               "--device", DEVICE, "--features-path", tmp_path / "features"]
    run_main("extract_features.py", *extract)
    meta_file = tmp_path / "features" / "meta.json"
    meta = json.loads(meta_file.read_text())
    assert (meta["vae"], meta["vae_sha256"]) == (str(tmp_path / "vae"), folder_digest(tmp_path / "vae"))
    monkeypatch.chdir(image_folder_path)
    common = ["--feature-path", tmp_path / "features", "--global-batch-size", "4", "--max-steps", "1",
              "--sample-every", "1", "--sample-steps", "2", "--sample-grid-size", "4", *latent_args(tiny_vae_path)]
    run_main("train.py", *common, "--results-dir", tmp_path / "r1")
    assert (only_experiment(tmp_path / "r1") / "samples" / "0000001.png").is_file()
    (tmp_path / "vae" / "notes.txt").write_text("another VAE now")
    with pytest.raises(ValueError, match=r"the VAE folder .*vae has changed since the latents were made"):
        run_main("train.py", *common, "--results-dir", tmp_path / "r2")
    before = meta_file.read_bytes()
    with pytest.raises(ValueError, match="holds a finished extraction; choose another folder, or pass --overwrite"):
        run_main("extract_features.py", *extract)
    assert meta_file.read_bytes() == before


@pytest.mark.parametrize("case, message", [
    ("file-as-folder", "--features-path: {features} is a file, not a folder"),  # was [Errno 17] File exists
    ("negative-workers", "--num-workers must be 0 or more, got -1"),  # was PyTorch's num_workers message
])
def test_a_bad_output_or_worker_flag_is_named_before_the_vae_loads(tmp_path, image_folder_path, tiny_vae_path,
                                                                   monkeypatch, case, message):
    """Issue 34, second pass."""
    import extract_features
    monkeypatch.setattr(extract_features, "extract", lambda *args: pytest.fail("the extraction started"))
    features = tmp_path / "features"
    workers = "-1" if case == "negative-workers" else "0"
    if case == "file-as-folder":
        features.write_text("notes")
    with pytest.raises(ValueError, match=f"^{re.escape(message.format(features=features))}$"):
        run_main("extract_features.py", "--data-path", image_folder_path, "--image-size", "32", "--vae",
                 tiny_vae_path, "--num-workers", workers, "--device", DEVICE, "--features-path", features)
