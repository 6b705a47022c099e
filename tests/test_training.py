"""ditlib/training.py: the EMA, the learning rate, the per-process batch, the latents a step trains on
(the whole loop end to end is in test_train.py)."""
import math
from copy import deepcopy

import pytest
import torch

from ditlib.datasets import TrainingData
from ditlib.errors import SettingError
from ditlib.training import LearningRate, class_dropout, per_process_batch, to_latents, update_ema
from models import DiT


def test_ema_update_formula_and_fixed_position_table():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=2)
    ema = deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    update_ema(ema, model, decay=0.9)
    after, current = ema.state_dict(), model.state_dict()
    assert torch.equal(after["pos_embed"], before["pos_embed"])
    name = "blocks.0.attn.qkv.weight"
    torch.testing.assert_close(after[name], 0.9 * before[name] + 0.1 * current[name])


def test_learning_rate_schedules():
    constant, cosine, linear = (LearningRate(lr=1e-3, warmup_steps=10, lr_schedule=schedule, lr_min=1e-5)
                                for schedule in ("constant", "cosine", "linear"))
    for step in range(10):  # the warm-up: (step + 1) / warmup of the rate
        assert constant.at(step, 110) == cosine.at(step, 110) == 1e-3 * (step + 1) / 10
    assert [constant.at(s, 110) for s in (10, 60, 110)] == [1e-3] * 3
    assert cosine.at(10, 110) == pytest.approx(1e-3)
    assert cosine.at(60, 110) == pytest.approx((1e-3 + 1e-5) / 2)
    assert cosine.at(85, 110) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.75)))
    assert linear.at(85, 110) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.25)
    assert cosine.at(110, 110) == linear.at(500, 110) == pytest.approx(1e-5)


def test_a_decaying_schedule_keeps_the_length_it_started_with():
    cosine = LearningRate(lr_schedule="cosine")
    assert cosine.schedule_length(0, 300) == (300, [])  # a new run: its own length
    length, notes = cosine.schedule_length(200, 300)  # resumed with a larger --max-steps
    assert length == 200 and "keeps the length of 200 steps" in notes[0]
    assert LearningRate().schedule_length(200, 300) == (200, [])  # constant: nothing to say


def test_per_process_batch_names_the_setting_that_does_not_divide():
    assert per_process_batch(8, 2, 2) == 4
    with pytest.raises(SettingError, match="is not divisible by the world size 3") as error:
        per_process_batch(8, 1, 3)
    assert error.value.setting == "global_batch_size"
    with pytest.raises(SettingError, match="3 does not divide the per-process batch 4") as error:
        per_process_batch(8, 3, 2)
    assert error.value.setting == "grad_accum_steps"


def test_no_random_flip_draws_no_flip():
    """--no-random-flip: the batch is untouched and nothing is drawn for it (the flip draw is not an
    official random number; with flips it is one torch.rand(N) per step)."""
    data = TrainingData(dataset=None, vae=None, vae_name="none", scale=1.0, channels=3, latent_size=4,
                        stored_latents=False)
    x = torch.randn(3, 3, 4, 4)
    state = torch.get_rng_state()
    out = to_latents(x, data, random_flip=False)
    assert torch.equal(out, x) and torch.equal(torch.get_rng_state(), state)
    flipped = to_latents(x, data, random_flip=True)
    assert not torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(f, s) or torch.equal(f, s.flip(2)) for f, s in zip(flipped, x))


def test_stored_latents_take_the_flipped_posterior_and_draw_from_it():
    """With latents from extract_features.py an item is (unflipped, flipped) x (mean, std): the flip
    picks the pair, then one draw mean + std * noise, scaled."""
    mean = torch.arange(2 * 4 * 2 * 2, dtype=torch.float32).view(2, 4, 2, 2)
    stored = torch.stack([torch.stack([mean, torch.zeros_like(mean)], 1),
                          torch.stack([-mean, torch.zeros_like(mean)], 1)], 1)  # zero std: no noise
    data = TrainingData(dataset=None, vae=None, vae_name="ema", scale=0.5, channels=4, latent_size=2,
                        stored_latents=True)
    torch.manual_seed(0)
    flips = torch.rand(2) < 0.5
    torch.manual_seed(0)
    out = to_latents(stored, data, random_flip=True)
    expected = torch.stack([-m if f else m for m, f in zip(mean, flips)]) * 0.5
    assert torch.equal(out, expected)
    assert torch.equal(to_latents(stored, data, random_flip=False), mean * 0.5)


def test_label_dropout_is_one_draw_of_the_embedders_shape():
    torch.manual_seed(3)
    drop = class_dropout(1000, 0.1, torch.device("cpu"))
    torch.manual_seed(3)
    assert torch.equal(drop, (torch.rand(1000) < 0.1).long()) and 50 < int(drop.sum()) < 150
    state = torch.get_rng_state()
    assert class_dropout(8, 0.0, torch.device("cpu")) is None and torch.equal(torch.get_rng_state(), state)
