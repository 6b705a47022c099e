"""ditlib/latents.py: the VAE's latents, drawn as diffusers draws them, stored exactly, and named for good
(the whole extraction end to end in test_extract_features.py)."""
import json

import numpy as np
import pytest
import torch

from ditlib.errors import SettingError
from ditlib.latents import (
    LatentFeatures,
    from_stored,
    latent_shape,
    load_vae,
    sample_latents,
    to_stored,
    vae_identity,
)


def test_a_posterior_draw_is_diffusers_draw(tiny_vae_path):
    vae = load_vae(str(tiny_vae_path), torch.device("cpu"))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    posterior = vae.encode(images).latent_dist
    torch.manual_seed(5)
    expected = posterior.sample() * 0.5
    torch.manual_seed(5)
    assert torch.equal(sample_latents(posterior.mean, posterior.std, 0.5), expected)
    assert latent_shape(vae, 32) == (4, 4) and latent_shape(None, 32) == (3, 32)
    with pytest.raises(SettingError, match="^image_size 36 is not a multiple of 8"):
        latent_shape(vae, 36)


@pytest.mark.parametrize("dtype, step", [("float32", 0.0), ("float16", 2 ** -10), ("bfloat16", 2 ** -7)])
def test_stored_posteriors_round_to_nearest_and_read_back_exactly(dtype, step):
    values = torch.randn(1000) * 3
    stored = to_stored(values, dtype)
    back = from_stored(stored, dtype)
    assert back.dtype == torch.float32
    assert torch.all((back - values).abs() <= step * values.abs() + 1e-30)  # at most half an ulp each
    assert torch.equal(from_stored(to_stored(back, dtype), dtype), back)  # stored values are exact


def test_latents_name_their_vae_and_are_checked_against_the_run(tmp_path, tiny_vae_path):
    assert vae_identity("ema") == {"vae": "ema"}
    local = vae_identity(str(tiny_vae_path))
    assert local["vae"] == str(tiny_vae_path.resolve()) and len(local["vae_sha256"]) == 64
    with pytest.raises(SettingError, match="has no meta.json: run extract_features.py") as error:
        LatentFeatures(str(tmp_path))
    assert error.value.setting == "feature_path"
    (tmp_path / "meta.json").write_text(json.dumps({"channels": 4, "latent_size": 4, "scale": 0.18215, "shards": [],
                                                   "image_size": 32, "num_classes": 3, "num_images": 0}))
    features = LatentFeatures(str(tmp_path))
    features.check_matches(32, 3)
    features.check_matches(32, 1000)  # more classes than the latents hold: fine
    with pytest.raises(SettingError, match="holds 32px latents, but --image-size is 64"):
        features.check_matches(64, 3)
    with pytest.raises(SettingError, match="has 3 classes, but --num-classes is 2"):
        features.check_matches(32, 2)
    assert np.isclose(features.scale, 0.18215) and len(features) == 0
