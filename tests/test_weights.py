"""ditlib/weights.py: strict loads that name what does not fit."""
import pytest
import torch
from helpers import DEVICE, run_main

from ditlib.weights import load_weights
from models import DiT_models


def test_mismatched_checkpoint_names_tensors_and_right_flags(tmp_path, trained_checkpoint):
    with pytest.raises(ValueError) as error:
        run_main("sample.py", "--ckpt", trained_checkpoint, "--model", "DiT-Nano/4", "--image-size", "64",
                 "--device", DEVICE, "--class-labels", "0", "--output", tmp_path / "x.png")
    assert "does not fit the chosen model" in str(error.value)
    assert "x_embedder.proj.weight: checkpoint (128, 4, 2, 2) vs model (128, 4, 4, 4)" in str(error.value)
    assert "--model DiT-Nano/2 --image-size 32" in str(error.value)


def test_load_weights_accepts_a_matching_state_dict():
    model = DiT_models["DiT-Nano/4"](input_size=8, num_classes=3)
    state = {k: v + 1 for k, v in model.state_dict().items()}
    load_weights(model, state, "in-memory")
    assert torch.equal(model.pos_embed, state["pos_embed"])
