"""DiT: a transformer that denoises latent patches, conditioned by adaLN-Zero on timestep and class.

Parameter names and shapes follow the official release, so its checkpoints load with strict=True.
The paper's three other block designs (its Section 3: in-context conditioning, cross-attention,
adaLN without the zero-initialised gates) are a constructor choice, `block=`.
Read top to bottom: embeddings, the blocks, the final layer, the model, the configs, op counting.
"""
import math
from functools import partial
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Mlp, PatchEmbed
from torch.utils.checkpoint import checkpoint


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-sample affine transform of every token: shift/scale are (N, D), x is (N, T, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ---------------------------------------------------------------------------------------------
# Fixed 2-D sin-cos position table (computed in float64, as the official numpy code does)
# ---------------------------------------------------------------------------------------------

def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, embed_dim) table: [sin | cos] of pos / 10000^(2i/embed_dim)."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    angles = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, embed_dim) table; the first half of the channels encodes grid[0] (the w axis)."""
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    coords = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(coords, coords), axis=0)  # meshgrid(w, h): grid[0] varies along w
    first = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    second = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([first, second], axis=1)


# ---------------------------------------------------------------------------------------------
# Conditioning embedders
# ---------------------------------------------------------------------------------------------

class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> D-dim vectors: 256 sinusoidal features, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
        """(N,) possibly fractional timesteps -> (N, dim) float32 features, [cos | sin]."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        # Follow the weights' dtype so a model cast to bf16/fp16 still runs outside autocast.
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> D-dim vectors. Row `num_classes` is the null class used for CFG dropout."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        has_null_class = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(has_null_class), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Swap labels for the null class: at random in training, or where force_drop_ids == 1."""
        if force_drop_ids is None:
            # Exactly one rand(N) draw on the labels' device, as in the official code.
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


# ---------------------------------------------------------------------------------------------
# Transformer blocks: the four designs of the paper's Section 3
# ---------------------------------------------------------------------------------------------

BLOCK_DESIGNS = ("adaln-zero", "adaln", "cross-attention", "in-context")


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated, and residuals gated, by c (adaLN-Zero).

    gated=False is the paper's plain adaLN design: shift and scale only, regressed from the same c.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, gated: bool = True):
        super().__init__()
        self.gated = gated
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = mlp(hidden_size, mlp_ratio)
        chunks = 6 if gated else 4
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, chunks * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
            return x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


def mlp(hidden_size: int, mlp_ratio: float) -> Mlp:
    """The blocks' feed-forward: D -> 4D -> D with tanh-approximated GELU, as the official model."""
    return Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio),
               act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)


class CrossAttention(nn.Module):
    """Multi-head attention from the image tokens (queries) to a short conditioning sequence."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(hidden_size, hidden_size, bias=True)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size, bias=True)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=True)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, tokens, width = x.shape
        head_dim = width // self.num_heads
        q = self.q(x).reshape(n, tokens, self.num_heads, head_dim).transpose(1, 2)
        k, v = self.kv(context).reshape(n, context.shape[1], 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, tokens, width))


class ViTBlock(nn.Module):
    """A standard pre-norm ViT block (the in-context design), with a cross-attention layer after
    self-attention when cross_attention=True (the cross-attention design)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, cross_attention: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        if cross_attention:
            self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
            self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = mlp(hidden_size, mlp_ratio)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        if context is not None:
            x = x + self.cross_attn(self.norm_cross(x), context)
        return x + self.mlp(self.norm2(x))


def make_block(design: str, hidden_size: int, num_heads: int, mlp_ratio: float) -> nn.Module:
    if design.startswith("adaln"):
        return DiTBlock(hidden_size, num_heads, mlp_ratio, gated=design == "adaln-zero")
    return ViTBlock(hidden_size, num_heads, mlp_ratio, cross_attention=design == "cross-attention")


class FinalLayer(nn.Module):
    """Modulated LayerNorm, then a Linear from each token to its p*p*out_channels patch values.

    adaptive=False (in-context and cross-attention designs, whose c is not a vector per block): a
    plain LayerNorm with learned affine parameters, then the same Linear.
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, adaptive: bool = True):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=not adaptive, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        if adaptive:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: Optional[torch.Tensor]) -> torch.Tensor:
        if not hasattr(self, "adaLN_modulation"):
            return self.linear(self.norm_final(x))
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class DiT(nn.Module):
    """Diffusion model with a transformer backbone: (x_t, t, y) -> [eps, variance interpolation]."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        gradient_checkpointing: bool = False,
        block: str = "adaln-zero",
    ):
        super().__init__()
        if block not in BLOCK_DESIGNS:
            raise ValueError(f"block must be one of {', '.join(BLOCK_DESIGNS)}, got {block!r}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.input_size = input_size
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.gradient_checkpointing = gradient_checkpointing
        self.block = block

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos table; a parameter (not a buffer) only so checkpoints keep the official keys.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([make_block(block, hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, adaptive=block.startswith("adaln"))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Official init; for adaLN-Zero every adaLN output and the final Linear start at zero, so
        output == 0. The other designs keep the ordinary (xavier) init of those layers."""
        def xavier_linear(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(xavier_linear)

        grid_size = int(self.x_embedder.num_patches ** 0.5)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        # The patch conv is a Linear over each flattened p x p x C patch: initialise it as one.
        conv_weight = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(conv_weight.view(conv_weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        if self.block != "adaln-zero":
            return
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in backward: less memory, same outputs and gradients."""
        self.gradient_checkpointing = enabled

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) tokens in row-major order -> (N, C, H, W) images."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        if h * w != x.shape[1]:
            raise ValueError(f"unpatchify expects a square token grid, got {x.shape[1]} tokens")
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        """Raise ValueError naming the expected shape/range, before timm's asserts or an index error."""
        if x.ndim != 4:
            raise ValueError(f"x must be (N, {self.in_channels}, {self.input_size}, {self.input_size}), "
                             f"got {tuple(x.shape)}")
        n, channels, height, width = x.shape
        if channels != self.in_channels:
            raise ValueError(f"x has {channels} channels, the model expects in_channels={self.in_channels}")
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"x spatial size {height}x{width} is not divisible by patch_size {self.patch_size}")
        if height != self.input_size or width != self.input_size:
            raise ValueError(f"x spatial size {height}x{width} differs from the model's input_size {self.input_size}")
        if t.ndim != 1 or t.shape[0] != n:
            raise ValueError(f"t must have shape ({n},) to match x's batch, got {tuple(t.shape)}")
        if y.ndim != 1 or y.shape[0] != n:
            raise ValueError(f"y must have shape ({n},) to match x's batch, got {tuple(y.shape)}")
        if y.is_floating_point() or y.is_complex():
            raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
        # Reading label values is free for CPU tensors; on an accelerator it would make every forward
        # wait for the device, so there the scripts check labels once, where they enter (the data's
        # class count, --class-labels), and the forward checks shapes and dtypes only.
        largest = self.y_embedder.embedding_table.num_embeddings - 1
        checkable = n and y.device.type == "cpu" and not torch.compiler.is_compiling()
        if checkable and (int(y.min()) < 0 or int(y.max()) > largest):
            raise ValueError(
                f"labels must lie in [0, {largest}] (num_classes={self.num_classes}"
                f"{', null class included' if largest == self.num_classes else ''}), "
                f"got min {int(y.min())} max {int(y.max())}"
            )

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (N, C, H, W) noisy latents, t: (N,) timesteps, y: (N,) labels -> (N, out_channels, H, W).
        force_drop_ids (N,): label dropout decided by the caller (1: null class) instead of drawn here,
        so a batch split into micro-batches drops the labels one whole-batch step would."""
        self._check_inputs(x, t, y)
        x = self.x_embedder(x) + self.pos_embed
        t_emb, y_emb = self.t_embedder(t), self.y_embedder(y, self.training, force_drop_ids)
        if self.block == "in-context":  # two extra tokens (no position), dropped after the last block
            x, c = torch.cat([x, t_emb.unsqueeze(1), y_emb.unsqueeze(1)], dim=1), None
        elif self.block == "cross-attention":  # a length-2 sequence the tokens attend to
            c = torch.stack([t_emb, y_emb], dim=1)
        else:  # adaLN(-Zero): one vector regressed into every block's shift/scale(/gate)
            c = t_emb + y_emb
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        if self.block == "in-context":
            x = x[:, :-2]
        x = self.final_layer(x, c if self.block != "cross-attention" else None)
        return self.unpatchify(x)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        guide_all_channels: bool = False,
    ) -> torch.Tensor:
        """Classifier-free guidance over a batch of [conditional half, null-label half].

        The first half of x is used for both halves. By default the guided eps covers the first 3
        channels only: that is how the released models were evaluated (FID 2.27 for XL/2).
        guide_all_channels=True guides every eps channel, which is the textbook formulation.
        """
        if x.shape[0] % 2:
            raise ValueError(f"forward_with_cfg needs an even batch (cond half, uncond half), got {x.shape[0]}")
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)
        guided = self.in_channels if guide_all_channels else min(3, self.in_channels)
        eps, rest = model_out[:, :guided], model_out[:, guided:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


class SiT(DiT):
    """SiT (Ma et al. 2024): DiT's network and parameters, trained as a flow (transport/). t is the
    interpolant's time in [0, 1] (1: data), passed to the timestep embedder as that float. With
    learn_sigma (SiT's training default) the second half of the output is never trained: the
    forward drops it, as SiT's does, so a SiT predicts in_channels channels."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = super().forward(x, t, y, force_drop_ids)
        return out[:, :self.in_channels] if self.learn_sigma else out


# ---------------------------------------------------------------------------------------------
# The 12 configs of the paper (Table 4), and small ones for CPU work; SiT's twelve are DiT's
# ---------------------------------------------------------------------------------------------

# name: (depth, hidden_size, patch_size, num_heads). Not in the paper: Ti follows ViT-Ti; Pico <
# Nano < Micro (head width 32) are the model sizes of experiments/scaling.py's grid.
CONFIGS = {
    "XL/2": (28, 1152, 2, 16), "XL/4": (28, 1152, 4, 16), "XL/8": (28, 1152, 8, 16),
    "L/2": (24, 1024, 2, 16), "L/4": (24, 1024, 4, 16), "L/8": (24, 1024, 8, 16),
    "B/2": (12, 768, 2, 12), "B/4": (12, 768, 4, 12), "B/8": (12, 768, 8, 12),
    "S/2": (12, 384, 2, 6), "S/4": (12, 384, 4, 6), "S/8": (12, 384, 8, 6),
    "Ti/2": (12, 192, 2, 3), "Ti/4": (12, 192, 4, 3),
    "Micro/2": (6, 192, 2, 6), "Micro/4": (6, 192, 4, 6), "Micro/8": (6, 192, 8, 6),
    "Nano/2": (4, 128, 2, 4), "Nano/4": (4, 128, 4, 4), "Nano/8": (4, 128, 8, 4),
    "Pico/2": (4, 64, 2, 2), "Pico/4": (4, 64, 4, 2), "Pico/8": (4, 64, 8, 2),
}


def configs(network: type) -> dict:
    """{"DiT-XL/2": constructor, ...}: each config's architecture, any other argument free."""
    return {f"{network.__name__}-{name}": partial(network, depth=depth, hidden_size=width, patch_size=patch,
                                                  num_heads=heads)
            for name, (depth, width, patch, heads) in CONFIGS.items()}


DiT_models = configs(DiT)
SiT_models = configs(SiT)


# ---------------------------------------------------------------------------------------------
# Complexity, counted from the operations a forward pass actually runs
# ---------------------------------------------------------------------------------------------

def count_forward_gmacs(model: DiT) -> float:
    """Multiply-accumulates (in billions) of one single-image forward, attention matmuls included.

    Works on a model built on the meta device (no memory, no time spent on real numbers); the
    counter reports 2 FLOPs per multiply-accumulate. The paper's "Gflops" column (Table 4) is this.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    device = model.pos_embed.device
    x = torch.zeros(1, model.in_channels, model.input_size, model.input_size, device=device)
    t = torch.zeros(1, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    counter = FlopCounterMode(display=False)
    was_training = model.training
    # The math backend spells attention out as matmuls, which the counter sees on every device.
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model.eval()
        model(x, t, y)
    model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9
