"""Move DiT weights to and from Hugging Face diffusers' DiTTransformer2DModel.

    python diffusers_interop.py export --ckpt results/.../0400000.pt --out dit-diffusers [--vae ema]
    python diffusers_interop.py import --folder dit-diffusers --out dit.pt [--model DiT-XL/2]

Export writes a DiTTransformer2DModel folder (and, with --vae, a DiTPipeline folder around it);
import writes a state dict that models.py loads with strict=True. The round trip is exact.

diffusers keeps a copy of the timestep and label embedders inside every block (the copies are the
same tensors here), splits the fused qkv projection into q, k and v, and recomputes the position
table itself. Its forward is not bit-identical to ours: its timestep features use frequencies
exp(-ln(10000) i / (half - 1)) where DiT uses / half, so the same weights see a slightly different
timestep embedding (see README for the measured gap).
"""
import argparse
from pathlib import Path

import torch

from files import atomic_torch_save
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
        converted[f"{theirs}norm1.emb.class_embedder.embedding_table.weight"] = ours["y_embedder.embedding_table.weight"]
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


def main() -> None:
    from processes import run_cli

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="DiT checkpoint -> diffusers folder")
    export.add_argument("--ckpt", required=True, help="a train.py checkpoint, a state dict or .safetensors")
    export.add_argument("--out", required=True)
    export.add_argument("--model", default=None)
    export.add_argument("--image-size", type=int, default=None)
    export.add_argument("--num-classes", type=int, default=None)
    export.add_argument("--vae", default=None, help="also write a DiTPipeline with this VAE (ema, mse or a folder)")
    export.add_argument("--weights", choices=["ema", "model"], default="ema")
    importer = commands.add_parser("import", help="diffusers folder -> DiT state dict")
    importer.add_argument("--folder", required=True, help="a DiTTransformer2DModel folder or a DiTPipeline folder")
    importer.add_argument("--out", required=True)
    args = parser.parse_args()
    run_cli(export_command if args.command == "export" else import_command, args)


def export_command(args: argparse.Namespace) -> None:
    from weights import load_model_for_sampling

    # The VAE is loaded only for a pipeline; otherwise the checkpoint's (or the official) geometry is used.
    model, vae, _ = load_model_for_sampling(args, torch.device("cpu"), default_vae="ema", with_vae=args.vae is not None)
    transformer = to_diffusers(model)
    out = Path(args.out)
    if vae is None:
        transformer.save_pretrained(out)
    else:
        from diffusers import DDIMScheduler, DiTPipeline
        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                  clip_sample=False)
        DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).save_pretrained(out)
    print(f"Wrote {out}")


def import_command(args: argparse.Namespace) -> None:
    from diffusers import DiTTransformer2DModel

    folder = Path(args.folder)
    if (folder / "transformer").is_dir():
        folder = folder / "transformer"
    transformer = DiTTransformer2DModel.from_pretrained(folder)
    state_dict = from_diffusers(transformer)
    DiT(**model_kwargs_from_diffusers(transformer.config)).load_state_dict(state_dict, strict=True)
    atomic_torch_save(state_dict, args.out)
    print(f"Wrote {args.out} ({', '.join(f'{k}={v}' for k, v in model_kwargs_from_diffusers(transformer.config).items())})")


if __name__ == "__main__":
    main()
