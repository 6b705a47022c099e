"""convert_diffusers.py: a checkpoint exported as a DiTPipeline loads in diffusers and imports back
exactly; a folder that is not a DiT is named."""
import pytest
import torch
from helpers import run_main, run_script


def test_cli_export_pipeline_and_import(tmp_path, tiny_vae_path, trained_checkpoint):
    run_script("convert_diffusers.py", "export", "--ckpt", trained_checkpoint, "--out", tmp_path / "pipe",
               "--vae", tiny_vae_path)
    from diffusers import DiTPipeline
    pipeline = DiTPipeline.from_pretrained(tmp_path / "pipe")
    assert pipeline.transformer.config.num_embeds_ada_norm == 2
    run_main("convert_diffusers.py", "import", "--folder", tmp_path / "pipe", "--out", tmp_path / "back.pt")
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    ema = torch.load(trained_checkpoint, weights_only=True)["ema"]
    assert back.keys() == ema.keys() and all(torch.equal(back[k], ema[k]) for k in ema)


def test_import_names_a_folder_that_is_not_a_dit(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^--folder .*empty: not a diffusers DiT folder"):
        run_main("convert_diffusers.py", "import", "--folder", tmp_path / "empty", "--out", tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_a_sit_is_refused_in_one_line(tmp_path):
    from models import SiT_models
    torch.save(SiT_models["SiT-Pico/4"](input_size=8, in_channels=3, num_classes=2).state_dict(), tmp_path / "s.pt")
    with pytest.raises(ValueError, match="holds a SiT-Pico/4: diffusers has no SiT pipeline"):
        run_main("convert_diffusers.py", "export", "--ckpt", tmp_path / "s.pt", "--model", "SiT-Pico/4",
                 "--image-size", "8", "--vae", "none", "--num-classes", "2", "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_export_over_an_earlier_pipeline_replaces_it_whole(tmp_path, tiny_vae_path, trained_checkpoint):
    """Issue 34, second pass: a transformer exported into a DiTPipeline folder was written beside the
    pipeline's transformer/, which import and DiTPipeline kept reading: the old weights, exit 0."""
    other = {k: v if k == "pos_embed" else v + 1  # diffusers recomputes the fixed positional embedding
             for k, v in torch.load(trained_checkpoint, weights_only=True)["ema"].items()}
    torch.save(other, tmp_path / "other.pt")
    export = ["convert_diffusers.py", "export", "--model", "DiT-Nano/2", "--image-size", "32", "--num-classes", "2",
              "--out", tmp_path / "pipe"]
    run_main(*export, "--ckpt", trained_checkpoint, "--vae", tiny_vae_path)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "pipe").rglob("*"))
    with pytest.raises(ValueError, match="is not empty; pass --overwrite to replace it with this export"):
        run_main(*export, "--ckpt", tmp_path / "other.pt")
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "pipe").rglob("*")) == before
    run_main(*export, "--ckpt", tmp_path / "other.pt", "--overwrite")
    transformer_only = ["config.json", "diffusion_pytorch_model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "pipe").iterdir()) == transformer_only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.pt", "pipe"]  # no staging or earlier folder left
    run_main("convert_diffusers.py", "import", "--folder", tmp_path / "pipe", "--out", tmp_path / "back.pt")
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert all(torch.equal(back[k], other[k]) for k in other)
    with pytest.raises(ValueError, match="back.pt exists; pass --overwrite to replace it"):  # a checkpoint, maybe
        run_main("convert_diffusers.py", "import", "--folder", tmp_path / "pipe", "--out", tmp_path / "back.pt")
    with pytest.raises(ValueError, match="is not a diffusers folder .*--overwrite replaces only an earlier export"):
        run_main(*export[:-1], tmp_path, "--ckpt", tmp_path / "other.pt", "--overwrite")
    with pytest.raises(ValueError, match="other.pt is a file; give a folder"):
        run_main(*export[:-1], tmp_path / "other.pt", "--ckpt", trained_checkpoint, "--overwrite")
    assert torch.equal(torch.load(tmp_path / "other.pt", weights_only=True)["y_embedder.embedding_table.weight"],
                       other["y_embedder.embedding_table.weight"])
