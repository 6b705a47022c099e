"""ditlib/diffusers_format.py: exact round trip, and the measured gap between diffusers' forward and ours."""
import pytest
import torch

from ditlib.diffusers_format import from_diffusers, model_kwargs_from_diffusers, to_diffusers, transformer_config
from models import BLOCK_DESIGNS, DiT

# Measured on the model below: diffusers' timestep features use frequencies / (half - 1) instead of
# DiT's / half; that alone moves the output by 0.0304 at most (2.7% of its largest value).
PARITY_ATOL = 0.05


def random_model() -> DiT:
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model.eval()


def inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(4, 4, 8, 8, generator=generator), torch.tensor([0, 10, 500, 999]), torch.tensor([1, 2, 3, 10])


def test_round_trip_is_exact():
    model = random_model()
    transformer = to_diffusers(model)
    back = from_diffusers(transformer)
    original = model.state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)
    rebuilt = DiT(**model_kwargs_from_diffusers(transformer.config)).eval()
    rebuilt.load_state_dict(back, strict=True)
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(rebuilt(x, t, y), model(x, t, y))


def test_diffusers_forward_gap_is_only_the_timestep_frequencies():
    model = random_model()
    transformer = to_diffusers(model)
    x, t, y = inputs()
    with torch.no_grad():
        ours = model(x, t, y)
        theirs = transformer(x, t, y).sample
        gap = (ours - theirs).abs().max().item()
        assert 0 < gap < PARITY_ATOL
        for block in transformer.transformer_blocks:  # give diffusers DiT's frequencies
            block.norm1.emb.time_proj.downscale_freq_shift = 0
        assert torch.equal(transformer(x, t, y).sample, ours)


def test_only_the_adaln_zero_design_exports():
    for block in BLOCK_DESIGNS[1:]:
        with pytest.raises(ValueError, match=f"the adaLN-Zero design; this model is {block}"):
            transformer_config(DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                                   num_classes=10, block=block))
