"""models.py: configs, complexity, initialisation, dtypes, checkpointing, input validation, and the
paper's four conditioning designs (shapes, init, guidance, dropout, Gflops, training)."""
import math

import pytest
import torch

from diffusion import create_diffusion
from ditlib.weights import block_design
from models import BLOCK_DESIGNS, DiT, DiT_models, SiT, SiT_models, count_forward_gmacs, get_2d_sincos_pos_embed

# Peebles & Xie, Table 4: forward Gflops at 256x256.
PAPER_GFLOPS = {
    "DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06, "DiT-B/8": 1.42, "DiT-B/4": 5.56, "DiT-B/2": 23.01,
    "DiT-L/8": 5.01, "DiT-L/4": 19.70, "DiT-L/2": 80.71, "DiT-XL/8": 7.39, "DiT-XL/4": 29.05, "DiT-XL/2": 118.64,
}
# The block-design figure of the paper (Figure 5 legend): DiT-XL/2 at 256px.
PAPER_XL2_DESIGN_GFLOPS = {"adaln-zero": 118.6, "adaln": 118.6, "cross-attention": 137.6, "in-context": 119.4}

# The paper's model sizes: 33M / 130M / 458M / 675M parameters (the /8 variants carry a larger
# patch projection, up to 0.7% more).
PAPER_PARAMS_M = {"S": 33, "B": 130, "L": 458, "XL": 675}

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def randomized(model: DiT, seed: int = 0) -> DiT:
    """Give a fresh model non-zero adaLN/final weights so outputs depend on every input."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


def tiny_inputs(n: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=generator)
    t = torch.randint(0, 1000, (n,), generator=generator)
    y = torch.randint(0, 10, (n,), generator=generator)
    return x, t, y


def meta_model(name: str, input_size: int = 32) -> DiT:
    with torch.device("meta"):
        return DiT_models[name](input_size=input_size)


@pytest.mark.parametrize("name", list(PAPER_GFLOPS))
def test_gflops_match_paper_table4(name):
    gmacs = count_forward_gmacs(meta_model(name))
    paper = PAPER_GFLOPS[name]
    assert abs(gmacs - paper) <= max(0.005 * paper, 0.005), (name, gmacs, paper)


def expected_param_count(depth: int, width: int, patch: int, latent: int = 32, channels: int = 4) -> int:
    """Closed form, layer by layer, independent of the module code."""
    d, tokens, out = width, (latent // patch) ** 2, 2 * channels
    embed = d * channels * patch * patch + d + (256 * d + d) + (d * d + d) + 1001 * d + tokens * d
    block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + (6 * d * d + 6 * d)
    final = (2 * d * d + 2 * d) + (patch * patch * out * d + patch * patch * out)
    return embed + depth * block + final


@pytest.mark.parametrize("name", list(PAPER_GFLOPS))
def test_param_counts(name):
    size, patch = name.split("-")[1].split("/")
    depth, width = {"S": (12, 384), "B": (12, 768), "L": (24, 1024), "XL": (28, 1152)}[size]
    params = sum(p.numel() for p in meta_model(name).parameters())
    assert params == expected_param_count(depth, width, int(patch))
    assert abs(params / 1e6 - PAPER_PARAMS_M[size]) <= 0.01 * PAPER_PARAMS_M[size]


def test_exact_official_param_counts():
    assert sum(p.numel() for p in meta_model("DiT-XL/2").parameters()) == 675_129_632
    assert sum(p.numel() for p in meta_model("DiT-S/2").parameters()) == 32_963_360


def test_gmacs_counted_on_real_tensors_equal_meta_count():
    with torch.device("meta"):
        on_meta = DiT(**TINY)
    assert count_forward_gmacs(DiT(**TINY)) == count_forward_gmacs(on_meta) > 0


def test_xl2_checkpoint_layout():
    state = meta_model("DiT-XL/2").state_dict()
    expected_shapes = {
        "pos_embed": (1, 256, 1152),
        "x_embedder.proj.weight": (1152, 4, 2, 2),
        "t_embedder.mlp.0.weight": (1152, 256),
        "t_embedder.mlp.2.weight": (1152, 1152),
        "y_embedder.embedding_table.weight": (1001, 1152),
        "blocks.27.attn.qkv.weight": (3456, 1152),
        "blocks.27.attn.proj.weight": (1152, 1152),
        "blocks.27.mlp.fc1.weight": (4608, 1152),
        "blocks.27.mlp.fc2.weight": (1152, 4608),
        "blocks.27.adaLN_modulation.1.weight": (6912, 1152),
        "final_layer.linear.weight": (32, 1152),
        "final_layer.adaLN_modulation.1.weight": (2304, 1152),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert len(state) == 1 + 2 + 4 + 1 + 28 * 10 + 4  # pos, x_emb, t_emb, y_emb, 28 blocks, final
    assert "blocks.28.attn.qkv.weight" not in state


def test_fresh_model_outputs_exactly_zero():
    model = DiT(**TINY)
    x, t, y = tiny_inputs()
    out = model(x, t, y)
    assert out.shape == (4, 8, 8, 8)
    assert torch.count_nonzero(out) == 0


def test_pos_embed_layout():
    table = get_2d_sincos_pos_embed(8, 3)  # 3x3 grid, 8 channels: [w: sin|cos][h: sin|cos]
    assert table.shape == (9, 8)
    token = 1 * 3 + 2  # row 1, column 2 in row-major order
    assert table[token, 0] == pytest.approx(math.sin(2.0), abs=1e-12)  # w = 2
    assert table[token, 2] == pytest.approx(math.cos(2.0), abs=1e-12)
    assert table[token, 4] == pytest.approx(math.sin(1.0), abs=1e-12)  # h = 1
    assert table[token, 5] == pytest.approx(math.sin(1.0 / 100), abs=1e-12)  # second frequency
    assert DiT(**TINY).pos_embed.requires_grad is False


def test_unpatchify_inverts_patchify_order():
    model = DiT(**{**TINY, "learn_sigma": False})
    images = torch.randn(2, 4, 8, 8)
    p = model.patch_size
    # Row-major tokens, each flattened as (p, p, C): the layout the final Linear writes.
    tokens = images.reshape(2, 4, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, p * p * 4)
    assert torch.equal(model.unpatchify(tokens), images)


def test_label_dropout_uses_one_rand_and_null_class():
    embedder = DiT(**TINY).y_embedder
    labels = torch.arange(10)
    torch.manual_seed(3)
    dropped = embedder.token_drop(labels)
    torch.manual_seed(3)
    expected = torch.where(torch.rand(10) < 0.1, 10, labels)
    assert torch.equal(dropped, expected)
    forced = embedder.token_drop(labels, force_drop_ids=(labels % 2 == 0).long())
    assert torch.equal(forced, torch.where(labels % 2 == 0, 10, labels))


def test_no_null_row_without_dropout():
    model = DiT(**{**TINY, "class_dropout_prob": 0.0})
    assert model.y_embedder.embedding_table.num_embeddings == 10
    x, t, _ = tiny_inputs(1)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        model(x, t, torch.tensor([10]))


def test_forward_with_cfg_guides_three_channels_by_default():
    model = randomized(DiT(**TINY)).eval()
    x, t, _ = tiny_inputs(4)
    x = torch.cat([x[:2], x[:2]])
    y = torch.tensor([1, 2, 10, 10])
    with torch.no_grad():
        raw = model(x, t, y)
        default = model.forward_with_cfg(x, t, y, 4.0)
        everything = model.forward_with_cfg(x, t, y, 4.0, guide_all_channels=True)
    guided = raw[2:] + 4.0 * (raw[:2] - raw[2:])
    torch.testing.assert_close(default[:2, :3], guided[:, :3])
    torch.testing.assert_close(default[2:, :3], guided[:, :3])
    torch.testing.assert_close(default[:, 3:], raw[:, 3:])  # channel 3 and the variances untouched
    torch.testing.assert_close(everything[:2, :4], guided[:, :4])
    torch.testing.assert_close(everything[:, 4:], raw[:, 4:])


@pytest.mark.parametrize("block", BLOCK_DESIGNS)
def test_gradient_checkpointing_changes_nothing(block):
    model = randomized(DiT(**TINY, block=block)).train()
    x, t, y = tiny_inputs()

    def run():
        model.zero_grad()
        torch.manual_seed(0)  # label dropout draws from the global RNG
        out = model(x, t, y)
        (out ** 2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_out, plain_grads = run()
    model.enable_gradient_checkpointing()
    ckpt_out, ckpt_grads = run()
    assert torch.equal(plain_out, ckpt_out)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name in plain_grads:
        assert torch.equal(plain_grads[name], ckpt_grads[name]), name
    assert DiT(**TINY, block=block, gradient_checkpointing=True).gradient_checkpointing


def test_bf16_model_and_autocast_close_to_fp32():
    model = randomized(DiT(**TINY)).eval()
    x, t, y = tiny_inputs()
    with torch.no_grad():
        reference = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_out = model(x, t, y)
        cast_out = model.to(torch.bfloat16)(x.bfloat16(), t, y)
    assert cast_out.dtype == torch.bfloat16
    scale = reference.abs().max()
    assert (autocast_out.float() - reference).abs().max() < 0.05 * scale
    assert (cast_out.float() - reference).abs().max() < 0.05 * scale


def test_timestep_embedding_follows_parameter_dtype():
    model = DiT(**TINY).to(torch.float64)
    emb = model.t_embedder(torch.tensor([0, 500]))
    assert emb.dtype == torch.float64


@pytest.mark.parametrize("change,message", [
    (lambda x, t, y: (x[:, :, :7, :7], t, y), "not divisible by patch_size 2"),
    (lambda x, t, y: (torch.randn(4, 4, 6, 6), t, y), "differs from the model's input_size 8"),
    (lambda x, t, y: (x[:, :3], t, y), "in_channels=4"),
    (lambda x, t, y: (x[0], t, y), r"\(N, 4, 8, 8\)"),
    (lambda x, t, y: (x, t, torch.tensor([0, 1, 11, 2])), r"\[0, 10\]"),
    (lambda x, t, y: (x, t, torch.tensor([0, -1, 1, 2])), r"\[0, 10\]"),
    (lambda x, t, y: (x, t[:3], y), r"t must have shape \(4,\)"),
    (lambda x, t, y: (x, t, y[:2]), r"y must have shape \(4,\)"),
    (lambda x, t, y: (x, t, y.float()), "integer class labels"),
])
def test_bad_inputs_raise_value_error(change, message):
    model = DiT(**TINY)
    with pytest.raises(ValueError, match=message):
        model(*change(*tiny_inputs()))


def test_null_class_is_a_valid_label():
    model = randomized(DiT(**TINY)).eval()
    x, t, y = tiny_inputs()
    null = model(x, t, torch.full((4,), 10))
    # Label dropout substitutes exactly this row: dropping every label in training gives the same output.
    model.train()
    model.y_embedder.dropout_prob = 1.0
    assert torch.equal(model(x, t, y), null)
    assert not torch.allclose(model.eval()(x, t, y), null)


def test_bad_configs_raise_value_error():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        DiT(**{**TINY, "input_size": 9})
    with pytest.raises(ValueError, match="num_heads"):
        DiT(**{**TINY, "num_heads": 5})
    with pytest.raises(ValueError, match="even batch"):
        DiT(**TINY).forward_with_cfg(*tiny_inputs(3), 1.5)


def test_other_input_sizes_and_pixel_space():
    model = DiT(input_size=12, patch_size=4, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=5)
    out = model(torch.randn(2, 3, 12, 12), torch.tensor([1, 2]), torch.tensor([0, 5]))
    assert out.shape == (2, 6, 12, 12)
    assert count_forward_gmacs(meta_model("DiT-XL/2", 64)) > 4 * 118.6  # 512px: 4x tokens, more attention


@pytest.mark.parametrize("block", BLOCK_DESIGNS)
def test_shapes_and_init(block):
    torch.manual_seed(0)
    model = DiT(**TINY, block=block).eval()
    out = model(*tiny_inputs())
    assert out.shape == (4, 8, 8, 8)
    # adaLN-Zero starts as the zero function; the other designs start as ordinary networks.
    assert (out.abs().max() == 0) == (block == "adaln-zero")
    assert block_design(model.state_dict()) == block


def test_each_design_has_its_own_layout():
    assert DiT(**TINY).block == "adaln-zero"  # the official layout (test_xl2_checkpoint_layout) is the default
    adaln = DiT(**TINY, block="adaln").state_dict()
    assert adaln["blocks.0.adaLN_modulation.1.weight"].shape == (4 * 64, 64)  # shift, scale; no gates
    cross = DiT(**TINY, block="cross-attention").state_dict()
    assert "blocks.0.cross_attn.kv.weight" in cross and "final_layer.adaLN_modulation.1.weight" not in cross
    in_context = DiT(**TINY, block="in-context").state_dict()
    assert not any("adaLN" in k or "cross_attn" in k for k in in_context)
    with pytest.raises(ValueError, match="block must be one of adaln-zero, adaln, cross-attention, in-context"):
        DiT(**TINY, block="film")


@pytest.mark.parametrize("block", BLOCK_DESIGNS)
def test_outputs_depend_on_timestep_and_label(block):
    torch.manual_seed(0)
    model = DiT(**TINY, block=block).eval()
    with torch.no_grad():  # adaLN-Zero needs non-zero modulation before the inputs can matter
        for name, p in model.named_parameters():
            if "adaLN" in name or "final_layer.linear" in name:
                p.normal_(0, 0.05)
    x, t, y = tiny_inputs()
    out = model(x, t, y)
    assert not torch.allclose(out, model(x, (t + 500) % 1000, y))
    assert not torch.allclose(out, model(x, t, (y + 1) % 10))


@pytest.mark.parametrize("block", BLOCK_DESIGNS)
def test_guidance_and_label_dropout(block):
    torch.manual_seed(0)
    model = DiT(**TINY, block=block, class_dropout_prob=0.5)
    x, t, y = tiny_inputs()
    doubled_y = torch.cat([y, torch.full_like(y, 10)])
    guided = model.eval().forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), doubled_y, cfg_scale=4.0)
    cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), doubled_y).chunk(2)
    assert torch.allclose(guided[:4, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]), atol=1e-5)
    # In training, dropped labels are exactly the null class's output.
    model.train()
    torch.manual_seed(1)
    dropped = model.y_embedder.token_drop(y)
    torch.manual_seed(1)
    with_dropout = model(x, t, y)
    torch.manual_seed(1)  # the same draw drops nothing more from already-dropped labels
    assert torch.equal(with_dropout, model(x, t, dropped))
    assert (dropped == 10).any() and (dropped != 10).any()


@pytest.mark.parametrize("block", BLOCK_DESIGNS)
def test_short_training_lowers_the_loss(block):
    torch.manual_seed(0)
    model = DiT(**TINY, block=block)
    diffusion = create_diffusion("")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, _, y = tiny_inputs(16)
    x = x.sign() * 0.8  # a learnable target: two-valued data
    t = torch.randint(0, 1000, (16,), generator=torch.Generator().manual_seed(2))

    def loss() -> torch.Tensor:
        torch.manual_seed(3)  # the same noise every time: only the weights change
        return diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()

    model.eval()
    with torch.no_grad():
        before = loss().item()
    model.train()
    for _ in range(30):
        opt.zero_grad()
        loss().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("block", BLOCK_DESIGNS)
def test_xl2_gflops_against_the_paper(block):
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=32, block=block)
    assert count_forward_gmacs(model) == pytest.approx(PAPER_XL2_DESIGN_GFLOPS[block], rel=1e-3)


def test_sits_twelve_names_are_dits_architectures():
    official = [f"{size}/{patch}" for size in ("S", "B", "L", "XL") for patch in (2, 4, 8)]
    assert all(f"SiT-{name}" in SiT_models for name in official)
    with torch.device("meta"):
        sit, dit = SiT_models["SiT-XL/2"](input_size=32), DiT_models["DiT-XL/2"](input_size=32)
    assert sum(p.numel() for p in sit.parameters()) == 675_129_632  # SiT-XL/2 has DiT-XL/2's parameters
    assert {k: v.shape for k, v in sit.state_dict().items()} == {k: v.shape for k, v in dit.state_dict().items()}
    assert count_forward_gmacs(sit) == count_forward_gmacs(dit)


def test_a_sit_drops_the_unused_half_and_embeds_its_time_as_a_float():
    sit = randomized(SiT(**TINY)).eval()
    dit = DiT(**TINY).eval()
    dit.load_state_dict(sit.state_dict())
    x, _, y = tiny_inputs()
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    with torch.no_grad():
        out = sit(x, t, y)
        full = dit(x, t, y)
        assert out.shape == (4, 4, 8, 8) and torch.equal(out, full[:, :4])
        assert not torch.allclose(sit(x, t + 0.1, y), out)  # fractional times move the output
        guided = sit.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)]),
                                      4.0)
    cond, uncond = full[:, :3], dit(x, t, torch.full_like(y, 10))[:, :3]
    torch.testing.assert_close(guided[:4, :3], uncond + 4.0 * (cond - uncond))
    assert guided.shape == (8, 4, 8, 8)
    four = SiT(**TINY, learn_sigma=False)
    assert four.out_channels == 4 and four(x, t, y).shape == (4, 4, 8, 8)
