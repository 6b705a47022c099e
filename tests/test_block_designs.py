"""The paper's four conditioning designs: shapes, init, guidance, dropout, Gflops, training, scripts."""
import json

import pytest
import torch
from helpers import DEVICE, make_image_folder, run_main, run_script
from PIL import Image

from bench.model_table import PAPER_XL2_DESIGN_GFLOPS
from diffusion import create_diffusion
from models import BLOCK_DESIGNS, DiT, DiT_models, count_forward_gmacs
from weights import block_design

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)



def inputs(n: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=generator), torch.randint(0, 1000, (n,), generator=generator),
            torch.randint(0, 10, (n,), generator=generator))


@pytest.mark.parametrize("block", BLOCK_DESIGNS)
def test_shapes_and_init(block):
    torch.manual_seed(0)
    model = DiT(**TINY, block=block).eval()
    out = model(*inputs())
    assert out.shape == (4, 8, 8, 8)
    # adaLN-Zero starts as the zero function; the other designs start as ordinary networks.
    assert (out.abs().max() == 0) == (block == "adaln-zero")
    assert block_design(model.state_dict()) == block


def test_adaln_zero_is_the_official_layout():
    official, chosen = DiT(**TINY).state_dict(), DiT(**TINY, block="adaln-zero").state_dict()
    assert {k: v.shape for k, v in official.items()} == {k: v.shape for k, v in chosen.items()}
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
    x, t, y = inputs()
    out = model(x, t, y)
    assert not torch.allclose(out, model(x, (t + 500) % 1000, y))
    assert not torch.allclose(out, model(x, t, (y + 1) % 10))


@pytest.mark.parametrize("block", BLOCK_DESIGNS)
def test_guidance_and_label_dropout(block):
    torch.manual_seed(0)
    model = DiT(**TINY, block=block, class_dropout_prob=0.5)
    x, t, y = inputs()
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
    x, _, y = inputs(16)
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
def test_gradient_checkpointing_changes_nothing(block):
    torch.manual_seed(0)
    plain = DiT(**TINY, block=block, class_dropout_prob=0.0)
    checkpointed = DiT(**TINY, block=block, class_dropout_prob=0.0, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    grads = []
    for model in (plain, checkpointed):
        model(*inputs()).square().mean().backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("block", BLOCK_DESIGNS)
def test_xl2_gflops_against_the_paper(block):
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=32, block=block)
    assert count_forward_gmacs(model) == pytest.approx(PAPER_XL2_DESIGN_GFLOPS[block], rel=1e-3)


def test_train_records_the_block_and_sampling_rebuilds_it(tmp_path):
    data = make_image_folder(tmp_path / "images", per_class=4)
    run_main("train.py", "--data-path", data, "--results-dir", tmp_path / "results", "--model", "DiT-Nano/4",
             "--image-size", "16", "--vae", "none", "--num-classes", "2", "--num-workers", "0", "--device", DEVICE,
             "--global-batch-size", "4", "--max-steps", "2", "--block", "cross-attention")
    checkpoint_path = next((tmp_path / "results").rglob("0000002.pt"))
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    assert checkpoint["args"]["block"] == "cross-attention"
    run_main("sample.py", "--ckpt", checkpoint_path, "--class-labels", "0", "1", "--num-sampling-steps", "2",
             "--output", tmp_path / "grid.png", "--device", DEVICE)
    # A bare state dict carries no args: the design is read from its weights.
    torch.save(checkpoint["ema"], tmp_path / "bare.pt")
    bare = ["--ckpt", tmp_path / "bare.pt", "--model", "DiT-Nano/4", "--image-size", "16", "--vae", "none",
            "--num-classes", "2", "--class-labels", "0", "--num-sampling-steps", "2", "--device", DEVICE]
    run_main("sample.py", *bare, "--output", tmp_path / "bare.png")
    assert Image.open(tmp_path / "grid.png").size == (38, 20) and Image.open(tmp_path / "bare.png").size == (16, 16)
    # Forcing another design on those weights names the one they hold.
    with pytest.raises(ValueError, match="--block cross-attention"):
        run_main("sample.py", *bare, "--block", "adaln-zero", "--output", tmp_path / "x.png")


@pytest.mark.slow  # two trainings, a judge and the FID network: over a minute on 2 cores
def test_ablation_script_smoke(tmp_path):
    out = tmp_path / "ablation"
    result = run_script("experiments.block_ablation", "--out", out, "--max-steps", "3", "--global-batch-size", "32",
                        "--log-every", "1", "--per-class", "1", "--sample-steps", "2", "--fid-reference", "30",
                        "--designs", "adaln", "in-context", timeout=600)
    report = json.loads((out / "ablation.json").read_text())
    assert [r["block"] for r in report["rows"]] == ["adaln", "in-context"]
    # Three steps draw blobs: near-chance classes, far from real digits (the held-out floor).
    assert all(r["steps"] == 3 and r["fid"] > 2 * report["fid_floor"] and r["class_accuracy"] < 0.5
               for r in report["rows"])
    with torch.device("meta"):
        params = {b: sum(p.numel() for p in DiT_models["DiT-Nano/4"](input_size=16, in_channels=3, num_classes=10,
                                                                    block=b).parameters() if p.requires_grad)
                  for b in ("adaln", "in-context")}
    assert {r["block"]: r["params"] for r in report["rows"]} == params
    assert (out / "ablation.md").read_text().count("\n") == 2 + 2 + 1
    assert Image.open(out / "loss_curves.png").size == (840, 504)
    assert "table, JSON and loss curves" in result.stdout


def test_design_table_and_diffusers_export_guard():
    from bench.model_table import design_table
    from diffusers_interop import transformer_config

    header, rows = design_table(names=("DiT-S/2",))
    assert [row[1] for row in rows] == list(BLOCK_DESIGNS) and header[3] == "Gflops 256px"
    assert rows[2][4] == "+15.0%"  # cross-attention's extra cost at S/2
    for block in BLOCK_DESIGNS[1:]:
        with pytest.raises(ValueError, match=f"the adaLN-Zero design; this model is {block}"):
            transformer_config(DiT(**TINY, block=block))
