"""DiT weights to and from Hugging Face diffusers' DiTTransformer2DModel (the one place that knows
diffusers' names; convert_diffusers.py is its command line). The round trip is exact.

diffusers keeps a copy of the timestep and label embedders inside every block (the copies are the
same tensors here), splits the fused qkv projection into q, k and v, and recomputes the position
table itself. Its forward is not bit-identical to ours: its timestep features use frequencies
exp(-ln(10000) i / (half - 1)) where DiT uses / half, so the same weights see a slightly different
timestep embedding (see README for the measured gap).
"""
import json
from pathlib import Path
from typing import Union

import torch

from ditlib.errors import SettingError, first_line
from models import DiT, get_2d_sincos_pos_embed


def transformer_config(model: DiT) -> dict:
    """The DiTTransformer2DModel arguments that describe the same network."""
    if model.block != "adaln-zero":
        raise ValueError(f"diffusers' DiTTransformer2DModel is the adaLN-Zero design; this model is {model.block}")
    width = model.pos_embed.shape[-1]
    table_rows = model.y_embedder.embedding_table.num_embeddings
    if table_rows != model.num_classes + 1:
        raise ValueError("diffusers' DiT always has a null-class row: export needs a model trained with label dropout")
    return dict(num_attention_heads=model.num_heads, attention_head_dim=width // model.num_heads,
                in_channels=model.in_channels, out_channels=model.out_channels, num_layers=len(model.blocks),
                sample_size=model.input_size, patch_size=model.patch_size, num_embeds_ada_norm=model.num_classes,
                norm_eps=1e-6)


def to_diffusers(model: DiT):
    """A DiTTransformer2DModel holding the same weights as model."""
    from diffusers import DiTTransformer2DModel

    ours = model.state_dict()
    converted = {"pos_embed.proj.weight": ours["x_embedder.proj.weight"],
                 "pos_embed.proj.bias": ours["x_embedder.proj.bias"],
                 "proj_out_1.weight": ours["final_layer.adaLN_modulation.1.weight"],
                 "proj_out_1.bias": ours["final_layer.adaLN_modulation.1.bias"],
                 "proj_out_2.weight": ours["final_layer.linear.weight"],
                 "proj_out_2.bias": ours["final_layer.linear.bias"]}
    for i in range(len(model.blocks)):
        theirs, mine = f"transformer_blocks.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            converted[f"{theirs}norm1.emb.timestep_embedder.linear_1.{kind}"] = ours[f"t_embedder.mlp.0.{kind}"]
            converted[f"{theirs}norm1.emb.timestep_embedder.linear_2.{kind}"] = ours[f"t_embedder.mlp.2.{kind}"]
            converted[f"{theirs}norm1.linear.{kind}"] = ours[f"{mine}adaLN_modulation.1.{kind}"]
            q, k, v = ours[f"{mine}attn.qkv.{kind}"].chunk(3, dim=0)
            converted[f"{theirs}attn1.to_q.{kind}"] = q
            converted[f"{theirs}attn1.to_k.{kind}"] = k
            converted[f"{theirs}attn1.to_v.{kind}"] = v
            converted[f"{theirs}attn1.to_out.0.{kind}"] = ours[f"{mine}attn.proj.{kind}"]
            converted[f"{theirs}ff.net.0.proj.{kind}"] = ours[f"{mine}mlp.fc1.{kind}"]
            converted[f"{theirs}ff.net.2.{kind}"] = ours[f"{mine}mlp.fc2.{kind}"]
        labels = ours["y_embedder.embedding_table.weight"]
        converted[f"{theirs}norm1.emb.class_embedder.embedding_table.weight"] = labels
    transformer = DiTTransformer2DModel(**transformer_config(model))
    transformer.load_state_dict({k: v.clone() for k, v in converted.items()}, strict=True)
    return transformer.eval()


def from_diffusers(transformer) -> dict:
    """Our state dict from a DiTTransformer2DModel (its per-block embedder copies must agree)."""
    theirs = transformer.state_dict()
    config = transformer.config
    depth = config.num_layers
    shared = {"t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
              "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
              "y_embedder.embedding_table": "norm1.emb.class_embedder.embedding_table"}
    ours = {}
    width = config.num_attention_heads * config.attention_head_dim
    grid = config.sample_size // config.patch_size
    ours["pos_embed"] = torch.from_numpy(get_2d_sincos_pos_embed(width, grid)).float().unsqueeze(0)
    ours["x_embedder.proj.weight"] = theirs["pos_embed.proj.weight"]
    ours["x_embedder.proj.bias"] = theirs["pos_embed.proj.bias"]
    for mine, name in shared.items():
        for kind in ("weight", "bias") if not mine.startswith("y_") else ("weight",):
            copies = [theirs[f"transformer_blocks.{i}.{name}.{kind}"] for i in range(depth)]
            if any(not torch.equal(c, copies[0]) for c in copies):
                raise ValueError(f"the blocks' copies of {name}.{kind} differ; DiT shares one embedder")
            ours[f"{mine}.{kind}"] = copies[0]
    for i in range(depth):
        theirs_block, mine = f"transformer_blocks.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            ours[f"{mine}attn.qkv.{kind}"] = torch.cat([theirs[f"{theirs_block}attn1.to_{x}.{kind}"] for x in "qkv"], 0)
            ours[f"{mine}attn.proj.{kind}"] = theirs[f"{theirs_block}attn1.to_out.0.{kind}"]
            ours[f"{mine}mlp.fc1.{kind}"] = theirs[f"{theirs_block}ff.net.0.proj.{kind}"]
            ours[f"{mine}mlp.fc2.{kind}"] = theirs[f"{theirs_block}ff.net.2.{kind}"]
            ours[f"{mine}adaLN_modulation.1.{kind}"] = theirs[f"{theirs_block}norm1.linear.{kind}"]
    for kind in ("weight", "bias"):
        ours[f"final_layer.adaLN_modulation.1.{kind}"] = theirs[f"proj_out_1.{kind}"]
        ours[f"final_layer.linear.{kind}"] = theirs[f"proj_out_2.{kind}"]
    return {k: v.clone() for k, v in ours.items()}


def model_kwargs_from_diffusers(config) -> dict:
    """DiT constructor arguments (beyond the config name) matching a DiTTransformer2DModel config."""
    return dict(input_size=config.sample_size, patch_size=config.patch_size, in_channels=config.in_channels,
                hidden_size=config.num_attention_heads * config.attention_head_dim, depth=config.num_layers,
                num_heads=config.num_attention_heads, num_classes=config.num_embeds_ada_norm,
                learn_sigma=config.out_channels == 2 * config.in_channels)


def transformer_folder(folder: Union[str, Path]) -> Path:
    """The DiTTransformer2DModel folder of a transformer folder or of a DiTPipeline folder around one."""
    folder = Path(folder)
    return folder / "transformer" if (folder / "transformer").is_dir() else folder


def read_transformer(folder: Union[str, Path], setting: str):
    """A DiTTransformer2DModel from a folder (or a pipeline folder), or an error naming the setting,
    the folder and what it holds instead."""
    from diffusers import DiTTransformer2DModel

    path = transformer_folder(folder)
    config = path / "config.json"
    if not config.is_file():
        raise SettingError(setting, f"{folder}: not a diffusers DiT folder (no config.json in it or in its "
                                    f"transformer/)")
    kind = json.loads(config.read_text()).get("_class_name")
    if kind != "DiTTransformer2DModel":
        raise SettingError(setting, f"{folder}: a diffusers {kind or 'model'} folder, not a DiTTransformer2DModel one")
    try:
        return DiTTransformer2DModel.from_pretrained(path)
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as error:
        raise SettingError(setting, f"{folder}: cannot load its DiTTransformer2DModel ({type(error).__name__}: "
                                    f"{first_line(error)})") from None


def read_diffusers_weights(folder: Union[str, Path], setting: str) -> tuple[dict, dict]:
    """(our state dict, DiT constructor arguments) of a diffusers DiT folder."""
    transformer = read_transformer(folder, setting)
    return from_diffusers(transformer), model_kwargs_from_diffusers(transformer.config)
