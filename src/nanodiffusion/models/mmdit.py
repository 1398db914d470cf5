"""MMDiT: the multimodal diffusion transformer of Stable Diffusion 3 / 3.5 (Esser et al. 2024, sec. 4, fig. 2).

The latent is cut into p x p patches plus learned positions (cropped from a pos_embed_max_size^2 grid at the centre);
the text (CLIP-L, CLIP-G and T5 states, concatenated) is projected to the model width. Every block keeps separate
weights for the two modalities and joins them in one attention over the concatenated sequence (eq. 6):
    [q; q_c], [k; k_c], [v; v_c] = per-modality projections,   a = softmax(Q K^T / sqrt(d)) V, split back,
each modality modulated by adaLN-Zero from c = MLP(sinusoid(t)) + MLP(pooled text) (DiT, sec. 3.2):
    x = x + gate * Attn(LN(x) (1 + scale) + shift),   x = x + gate' * MLP(LN(x) (1 + scale') + shift').
The last block only feeds the text into attention ("context_pre_only"). SD3.5 normalises Q and K per head with
RMSNorm (qk_norm "rms_norm", Dehghani et al. 2023), and SD3.5-medium adds a second, image-only self-attention with
its own modulation to its first blocks (MMDiT-X, `dual_attention_layers`).

Config fields and state_dict keys are diffusers' SD3Transformer2DModel's (transformer_blocks.0.attn.add_q_proj, ...).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import NanoDiffusionError, choice_error
from .attention import Attention, to_tokens
from .dit import modulate, sincos_positions
from .resnet import TimestepEmbedding, timestep_embedding
from .t5 import RMSNorm

TIME_CHANNELS = 256   # sinusoidal timestep features
EPS = 1e-6            # every LayerNorm and RMSNorm of the MMDiT
QK_NORMS = (None, "rms_norm")


@dataclass
class MMDiTConfig:
    """diffusers' SD3Transformer2DModel config.json fields (defaults are diffusers', SD3-medium's sizes); keys an older
    config lacks (qk_norm, dual_attention_layers) take these defaults, unknown keys are ignored."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: list[int] = field(default_factory=list)
    qk_norm: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> MMDiTConfig:
        """Config from a diffusers config.json dict; out_channels null means in_channels."""
        names = {f.name for f in dataclasses.fields(cls)}
        c = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items() if k in names}
        if c.get("out_channels") is None:
            c["out_channels"] = c.get("in_channels", cls.in_channels)
        return cls(**c)

    def to_dict(self) -> dict:
        """A config.json dict that diffusers' SD3Transformer2DModel.from_config accepts."""
        return {"_class_name": "SD3Transformer2DModel", **dataclasses.asdict(self)}

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


def check_config(c: MMDiTConfig) -> None:
    """Clear errors for configs this transformer cannot build."""
    if c.qk_norm not in QK_NORMS:
        raise choice_error("MMDiT qk_norm", c.qk_norm, [str(n) for n in QK_NORMS])
    if c.caption_projection_dim != c.inner_dim:
        raise NanoDiffusionError(f"MMDiT config does not fit: caption_projection_dim {c.caption_projection_dim} must "
                                 f"equal num_attention_heads * attention_head_dim = {c.inner_dim}")


class AdaLayerNorm(nn.Module):
    """LayerNorm without affine parameters plus `chunks` modulation vectors regressed from the conditioning,
    Linear(SiLU(c)) (adaLN, Peebles & Xie 2023, sec. 3.2)."""

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(dim, chunks * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=EPS)

    def forward(self, c: Tensor) -> tuple[Tensor, ...]:
        return self.linear(F.silu(c)).chunk(self.chunks, dim=1)


class JointAttention(Attention):
    """softmax(Q K^T / sqrt(d)) V over image tokens and, when given, text tokens, each projected by its own weights
    (Esser et al. 2024, eq. 6); Q and K optionally RMS-normalised per head (SD3.5). `joint` adds the text's
    projections (add_q/k/v_proj), `context_out` its output projection (all blocks but the last)."""

    def __init__(self, dim: int, heads: int, dim_head: int, qk_norm: str | None, joint: bool = False,
                 context_out: bool = False):
        super().__init__(dim, heads, dim_head, bias=True)
        inner = heads * dim_head

        def norm() -> RMSNorm | None:
            return RMSNorm(dim_head, EPS) if qk_norm == "rms_norm" else None

        self.norm_q, self.norm_k = norm(), norm()
        if joint:
            self.add_q_proj = nn.Linear(dim, inner)
            self.add_k_proj = nn.Linear(dim, inner)
            self.add_v_proj = nn.Linear(dim, inner)
            self.norm_added_q, self.norm_added_k = norm(), norm()
            self.to_add_out = nn.Linear(inner, dim) if context_out else None

    def heads_of(self, x: Tensor, projections: tuple[nn.Module, nn.Module, nn.Module],
                 norms: tuple[nn.Module | None, nn.Module | None]) -> list[Tensor]:
        """q, k, v [B, heads, N, d] of one modality, q and k normalised when the block has QK norm."""
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, -1).transpose(1, 2) for proj in projections)
        return [q if norms[0] is None else norms[0](q), k if norms[1] is None else norms[1](k), v]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(image output, text output or None)."""
        b, n, _ = x.shape
        q, k, v = self.heads_of(x, (self.to_q, self.to_k, self.to_v), (self.norm_q, self.norm_k))
        if context is not None:
            text = self.heads_of(context, (self.add_q_proj, self.add_k_proj, self.add_v_proj),
                                 (self.norm_added_q, self.norm_added_k))
            q, k, v = (torch.cat([a, t], dim=2) for a, t in zip((q, k, v), text))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, q.shape[2], -1)
        image, text = out[:, :n], out[:, n:]
        if context is None or self.to_add_out is None:
            return self.to_out[0](image), None
        return self.to_out[0](image), self.to_add_out(text)


class GELUProjection(nn.Module):
    """GELU(x W + b), tanh approximation."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class MLP(nn.Module):
    """Position-wise feed-forward Linear(GELU(Linear(x))), 4x wider inside."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GELUProjection(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class JointTransformerBlock(nn.Module):
    """One MMDiT block (Esser et al. 2024, fig. 2b); `context_pre_only` (the last block) returns no text, and
    `dual` adds an image-only self-attention with its own shift / scale / gate (SD3.5-medium, MMDiT-X)."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_pre_only: bool, qk_norm: str | None,
                 dual: bool):
        super().__init__()
        self.context_pre_only, self.dual = context_pre_only, dual
        self.norm1 = AdaLayerNorm(dim, 9 if dual else 6)
        self.norm1_context = AdaLayerNorm(dim, 2 if context_pre_only else 6)
        self.attn = JointAttention(dim, heads, dim_head, qk_norm, joint=True, context_out=not context_pre_only)
        self.attn2 = JointAttention(dim, heads, dim_head, qk_norm) if dual else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=EPS)
        self.ff = MLP(dim)
        if not context_pre_only:
            self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=EPS)
            self.ff_context = MLP(dim)

    def forward(self, x: Tensor, context: Tensor, c: Tensor) -> tuple[Tensor, Tensor | None]:
        """(image tokens, text tokens) after the block, conditioned on c [B, dim]."""
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp, *second = self.norm1(c)
        h = self.norm1.norm(x)
        if self.context_pre_only:
            c_scale, c_shift = self.norm1_context(c)
        else:
            c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(c)
        a, a_text = self.attn(modulate(h, shift, scale), modulate(self.norm1_context.norm(context), c_shift, c_scale))
        x = x + gate[:, None] * a
        if self.dual:
            shift2, scale2, gate2 = second
            x = x + gate2[:, None] * self.attn2(modulate(h, shift2, scale2))[0]
        x = x + gate_mlp[:, None] * self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp))
        if self.context_pre_only:
            return x, None
        context = context + c_gate[:, None] * a_text
        context = context + c_gate_mlp[:, None] * self.ff_context(
            modulate(self.norm2_context(context), c_shift_mlp, c_scale_mlp))
        return x, context


class PatchEmbed(nn.Module):
    """Patchify: a p x p stride-p convolution to tokens, plus the learned positions of the centre crop of the
    pos_embed_max_size^2 grid that the latent covers (SD3 trains at several sizes on one grid)."""

    def __init__(self, c: MMDiTConfig):
        super().__init__()
        self.patch_size, self.grid = c.patch_size, c.pos_embed_max_size
        self.proj = nn.Conv2d(c.in_channels, c.inner_dim, c.patch_size, stride=c.patch_size)
        # learned: checkpoints carry the trained grid; a new model starts from DiT's fixed sin-cos positions
        self.register_buffer("pos_embed", sincos_positions(c.inner_dim, c.pos_embed_max_size)[None])

    def positions(self, rows: int, cols: int) -> Tensor:
        """[1, rows * cols, dim]: the centred rows x cols window of the position grid."""
        if rows > self.grid or cols > self.grid:
            size = self.grid * self.patch_size
            raise NanoDiffusionError(f"latent of {rows * self.patch_size} x {cols * self.patch_size} is larger than "
                                     f"this MMDiT's position grid ({size} x {size} latent pixels): lower the size")
        top, left = (self.grid - rows) // 2, (self.grid - cols) // 2
        grid = self.pos_embed.view(self.grid, self.grid, -1)
        return grid[top:top + rows, left:left + cols].reshape(1, rows * cols, -1)

    def forward(self, x: Tensor) -> Tensor:
        tokens = to_tokens(self.proj(x))
        return tokens + self.positions(x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size).to(tokens)


class TimeTextEmbedding(nn.Module):
    """The conditioning vector c = MLP(sinusoid(t)) + MLP(pooled text embedding) (Esser et al. 2024, fig. 2a)."""

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIME_CHANNELS, dim)
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)   # the same Linear, SiLU, Linear

    def forward(self, t: Tensor, pooled: Tensor) -> Tensor:
        time = self.timestep_embedder(timestep_embedding(t, TIME_CHANNELS).to(pooled.dtype))
        return time + self.text_embedder(pooled)


class SD3Transformer2DModel(nn.Module):
    """v(x, t, text, pooled): patchify -> joint blocks over [image; text] tokens -> adaLN final layer -> unpatchify."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        check_config(config)
        self.config = c = config
        d = c.inner_dim
        self.pos_embed = PatchEmbed(c)
        self.time_text_embed = TimeTextEmbedding(d, c.pooled_projection_dim)
        self.context_embedder = nn.Linear(c.joint_attention_dim, c.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(
            JointTransformerBlock(d, c.num_attention_heads, c.attention_head_dim,
                                  context_pre_only=i == c.num_layers - 1, qk_norm=c.qk_norm,
                                  dual=i in c.dual_attention_layers)
            for i in range(c.num_layers))
        self.norm_out = AdaLayerNorm(d, 2)
        self.proj_out = nn.Linear(d, c.patch_size * c.patch_size * c.out_channels)

    def forward(self, sample: Tensor, timestep: Tensor | float, encoder_hidden_states: Tensor,
                pooled_projections: Tensor) -> Tensor:
        """Velocity for the latent `sample` [B, C, H, W] at `timestep` (1000 t, scalar or [B]), given the text states
        [B, L, joint_attention_dim] and the pooled text embedding [B, pooled_projection_dim]."""
        b, _, height, width = sample.shape
        p, channels = self.config.patch_size, self.config.out_channels
        if height % p or width % p:
            raise NanoDiffusionError(f"latent size {height} x {width} must be a multiple of the patch size {p}")
        t = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(-1).expand(b)
        x = self.pos_embed(sample)
        c = self.time_text_embed(t, pooled_projections).to(x.dtype)   # modulation in the blocks' compute dtype
        context = self.context_embedder(encoder_hidden_states)
        for block in self.transformer_blocks:
            x, context = block(x, context, c)
        scale, shift = self.norm_out(c)
        x = self.proj_out(modulate(self.norm_out.norm(x), shift, scale))
        x = x.view(b, height // p, width // p, p, p, channels)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, height, width)
