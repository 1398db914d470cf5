"""The key tables: original single-file SD names (CompVis / Stability) <-> diffusers / transformers names.

Each model gets ONE explicit table of (diffusers name, original name) pairs, generated from its block
structure and used in both directions. A pair names a module prefix ("down_blocks.0.resnets.1." <->
"input_blocks.2.0.") or a whole key; a key is renamed by its longest matching entry. The few places
where tensors change shape too are marked in the table (VAE mid attention: conv1x1 <-> linear) or
named as a step (OpenCLIP's fused in_proj <-> separate q/k/v); OpenCLIP's text_projection is marked as stored
transposed.

Families: SD 1.x (CLIP ViT-L under cond_stage_model.transformer.), SD 2.x (OpenCLIP ViT-H under
cond_stage_model.model.), SDXL (CLIP ViT-L and OpenCLIP ViT-bigG under conditioner.embedders.0 / .1, the refiner
bigG alone under conditioner.embedders.0.model.); the UNet and VAE tables are shared, SDXL's UNet adds
label_emb (its added conditioning). SD3 / SD3.5 (Stability's MMDiT files) keep the MMDiT under
model.diffusion_model. (joint_blocks, fused qkv, (shift, scale) halves in the pre-only adaLN layers), the
16-channel VAE under first_stage_model., and optionally CLIP-L, CLIP-G and T5-XXL under text_encoders.*.transformer.
in transformers names.

Text encoder names are transformers' CLIP names as files store them ("text_model.embeddings.",
"text_model.encoder.", "text_model.final_layer_norm."), which our models/clip.py uses too;
`text_model_names` adds the "text_model." that transformers 5 leaves out when it saves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import NanoDiffusionError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."      # SD 1.x: transformers CLIP names
OPEN_CLIP_PREFIX = "cond_stage_model.model."        # SD 2.x: OpenCLIP ViT-H/14 text tower
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."   # SDXL: CLIP ViT-L, transformers names
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."    # SDXL: OpenCLIP ViT-bigG/14 text tower
REFINER_OPEN_CLIP_PREFIX = "conditioner.embedders.0.model."  # the SDXL refiner: bigG alone
LAYOUT_PREFIX = "layout_model."                      # the built-in model's layout stage (models/layout.py), ours
SD3_CLIP_L_PREFIX = "text_encoders.clip_l.transformer."   # SD3: CLIP ViT-L, transformers names
SD3_CLIP_G_PREFIX = "text_encoders.clip_g.transformer."   # SD3: OpenCLIP ViT-bigG, transformers names
SD3_T5_PREFIX = "text_encoders.t5xxl.transformer."        # SD3: T5-XXL encoder, transformers names
MMDIT_BLOCKS = "joint_blocks."                            # SD3's MMDiT in the original names
MMDIT_PATCHES = "x_embedder.proj.weight"                  # the MMDiT's patch embedding: what marks an SD3 file
TEXT_MODEL = "text_model."
PROJECTION = "text_projection."


@dataclass(frozen=True)
class Entry:
    """One row of a key table: a diffusers name and the original name (prefixes end with '.')."""

    diffusers: str
    original: str
    conv1x1: bool = False     # weight is a 1x1 conv in the original file and a linear layer in diffusers
    transposed: bool = False  # the original stores the matrix transposed (OpenCLIP's x @ text_projection)
    swapped: bool = False     # the original orders the output halves (shift, scale), diffusers (scale, shift)


class KeyTable:
    """A list of (diffusers, original) name pairs, looked up by longest matching prefix in either direction."""

    def __init__(self, entries: list[Entry]):
        self.entries = entries
        self.by_name = {True: {e.diffusers: e for e in entries}, False: {e.original: e for e in entries}}

    def rename(self, key: str, *, to_original: bool) -> tuple[str, Entry] | None:
        """The key's name on the other side and the matching entry, or None when no entry matches."""
        table = self.by_name[to_original]
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            head = ".".join(parts[:n]) + ("" if n == len(parts) else ".")
            entry = table.get(head)
            if entry is not None:
                source, target = (entry.diffusers, entry.original) if to_original else (entry.original, entry.diffusers)
                return target + key[len(source):], entry
        return None

    def convert(self, sd: dict[str, Tensor], *, to_original: bool, part: str) -> dict[str, Tensor]:
        """Rename every key of a state dict (and reshape conv1x1 <-> linear weights where marked)."""
        out, unknown = {}, []
        for key, tensor in sd.items():
            found = self.rename(key, to_original=to_original)
            if found is None:
                unknown.append(key)
                continue
            name, entry = found
            if entry.conv1x1:
                tensor = conv1x1_to_linear(tensor, to_conv=to_original)
            if entry.swapped:
                tensor = torch.cat(tensor.chunk(2)[::-1])
            out[name] = tensor.T.contiguous() if entry.transposed else tensor
        if unknown:
            raise key_error(part, "unexpected", unknown)
        return out


def key_error(part: str, kind: str, keys: list[str]) -> NanoDiffusionError:
    """One-line error naming the first few missing / unexpected keys and how many there are."""
    shown = ", ".join(sorted(keys)[:5])
    return NanoDiffusionError(f"{part}: {len(keys)} {kind} keys ({shown}{', ...' if len(keys) > 5 else ''}); "
                              f"the checkpoint does not match this model layout")


def conv1x1_to_linear(weight: Tensor, *, to_conv: bool) -> Tensor:
    """A 1x1 convolution weight [out, in, 1, 1] is a linear weight [out, in] (biases pass through)."""
    if to_conv and weight.ndim == 2:
        return weight[:, :, None, None]
    if not to_conv and weight.ndim == 4:
        return weight[:, :, 0, 0]
    return weight


def count_indices(sd: dict[str, Tensor], prefix: str) -> int:
    """How many numbered children live under prefix ("down_blocks." -> 4 for SD)."""
    found = {key[len(prefix):].split(".")[0] for key in sd if key.startswith(prefix)}
    return 1 + max((int(i) for i in found if i.isdigit()), default=-1)


def has_prefix(sd: dict[str, Tensor], prefix: str) -> bool:
    """Whether any key starts with prefix."""
    return any(key.startswith(prefix) for key in sd)


# ---- UNet (ldm openaimodel.UNetModel <-> diffusers UNet2DConditionModel) ----

@dataclass(frozen=True)
class UNetLayout:
    """The block structure the key table depends on: res blocks per level and where attention is."""

    layers_per_block: int
    down_attention: tuple[bool, ...]   # per level, highest resolution first
    up_attention: tuple[bool, ...]     # per level, lowest resolution first

    @classmethod
    def from_diffusers(cls, sd: dict[str, Tensor]) -> UNetLayout:
        """Read the layout from diffusers names."""
        levels = count_indices(sd, "down_blocks.")
        return cls(count_indices(sd, "down_blocks.0.resnets."),
                   tuple(has_prefix(sd, f"down_blocks.{i}.attentions.") for i in range(levels)),
                   tuple(has_prefix(sd, f"up_blocks.{i}.attentions.") for i in range(levels)))

    @classmethod
    def from_original(cls, sd: dict[str, Tensor]) -> UNetLayout:
        """Read the layout from original names: downsamplers ("input_blocks.K.0.op") split the levels."""
        blocks = count_indices(sd, "input_blocks.")
        first_down = next((k for k in range(1, blocks) if f"input_blocks.{k}.0.op.weight" in sd), blocks)
        per_level = first_down            # R res blocks + 1 downsampler
        levels = blocks // per_level
        return cls(per_level - 1,
                   tuple(has_prefix(sd, f"input_blocks.{1 + i * per_level}.1.") for i in range(levels)),
                   tuple(has_prefix(sd, f"output_blocks.{i * per_level}.1.") for i in range(levels)))


def unet_resnet(d: str, o: str) -> list[Entry]:
    """ResBlock: in_layers = (norm, SiLU, conv), emb_layers = (SiLU, linear), out_layers = (norm, SiLU, drop, conv)."""
    names = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
             ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
    return [Entry(f"{d}{a}.", f"{o}{b}.") for a, b in names]


def unet_table(layout: UNetLayout) -> KeyTable:
    """The UNet key table: ldm's flat input_blocks / middle_block / output_blocks vs diffusers' nested blocks."""
    entries = [Entry("conv_in.", "input_blocks.0.0."), Entry("time_embedding.linear_1.", "time_embed.0."),
               Entry("time_embedding.linear_2.", "time_embed.2."), Entry("conv_norm_out.", "out.0."),
               Entry("conv_out.", "out.2."),
               Entry("add_embedding.linear_1.", "label_emb.0.0."), Entry("add_embedding.linear_2.", "label_emb.0.2.")]
    r, levels = layout.layers_per_block, len(layout.down_attention)
    k = 1
    for i, attention in enumerate(layout.down_attention):
        for j in range(r):
            entries += unet_resnet(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.")
            if attention:
                entries.append(Entry(f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1."))
            k += 1
        if i < levels - 1:
            entries.append(Entry(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{k}.0.op."))
            k += 1
    entries += unet_resnet("mid_block.resnets.0.", "middle_block.0.")
    entries.append(Entry("mid_block.attentions.0.", "middle_block.1."))
    entries += unet_resnet("mid_block.resnets.1.", "middle_block.2.")
    k = 0
    for i, attention in enumerate(layout.up_attention):
        for j in range(r + 1):
            entries += unet_resnet(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.")
            if attention:
                entries.append(Entry(f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1."))
            if j == r and i < levels - 1:
                entries.append(Entry(f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{k}.{1 + attention}.conv."))
            k += 1
    return KeyTable(entries)


# ---- VAE (ldm Encoder / Decoder <-> diffusers AutoencoderKL) ----

def vae_mid(side: str) -> list[Entry]:
    """Mid block: two ResBlocks around one self-attention whose q/k/v/proj are 1x1 convs in the original."""
    d, o = f"{side}.mid_block.", f"{side}.mid."
    attention = [("group_norm", "norm", False), ("to_q", "q", True), ("to_k", "k", True), ("to_v", "v", True),
                 ("to_out.0", "proj_out", True)]
    return (vae_resnet(f"{d}resnets.0.", f"{o}block_1.") + vae_resnet(f"{d}resnets.1.", f"{o}block_2.")
            + [Entry(f"{d}attentions.0.{a}.", f"{o}attn_1.{b}.", c) for a, b, c in attention])


def vae_resnet(d: str, o: str) -> list[Entry]:
    """VAE ResnetBlock: same names except the shortcut (nin_shortcut <-> conv_shortcut)."""
    return [Entry(d, o), Entry(f"{d}conv_shortcut.", f"{o}nin_shortcut.")]


def vae_table(levels: int, layers_per_block: int) -> KeyTable:
    """The VAE key table; the original decoder numbers its up levels from the lowest resolution backwards."""
    entries = [Entry(name, name) for name in ("quant_conv.", "post_quant_conv.", "encoder.conv_in.",
                                              "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.")]
    entries += [Entry(f"{side}.conv_norm_out.", f"{side}.norm_out.") for side in ("encoder", "decoder")]
    entries += vae_mid("encoder") + vae_mid("decoder")
    for i in range(levels):
        for j in range(layers_per_block):
            entries += vae_resnet(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.")
        if i < levels - 1:
            entries.append(Entry(f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv."))
        b = levels - 1 - i
        for j in range(layers_per_block + 1):
            entries += vae_resnet(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{b}.block.{j}.")
        if i < levels - 1:
            entries.append(Entry(f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{b}.upsample.conv."))
    return KeyTable(entries)


def vae_table_for(sd: dict[str, Tensor], *, original: bool) -> KeyTable:
    """The VAE table sized from a state dict in either naming."""
    if original:
        return vae_table(count_indices(sd, "encoder.down."), count_indices(sd, "encoder.down.0.block."))
    return vae_table(count_indices(sd, "encoder.down_blocks."), count_indices(sd, "encoder.down_blocks.0.resnets."))


# ---- MMDiT (SD3 / SD3.5: Stability's joint_blocks <-> diffusers SD3Transformer2DModel) ----

# The attention projections diffusers keeps apart and the original fuses into one qkv: (diffusers name with {} for
# q / k / v, the fused name on the diffusers side of the table).
MMDIT_QKV = ((".attn.to_{}.", ".attn.qkv."), (".attn.add_{}_proj.", ".attn.add_qkv."), (".attn2.to_{}.", ".attn2.qkv."))


def mmdit_table(layers: int) -> KeyTable:
    """The MMDiT key table. Each joint block has an image stream (x_block) and a text stream (context_block); the
    last block's text stream is pre-only (no output projection or MLP after its attention), and its adaLN layer, like
    the final layer's, is diffusers' AdaLayerNormContinuous, which orders the halves the other way."""
    entries = [Entry("pos_embed.pos_embed", "pos_embed"), Entry("pos_embed.proj.", "x_embedder.proj."),
               Entry("time_text_embed.timestep_embedder.linear_1.", "t_embedder.mlp.0."),
               Entry("time_text_embed.timestep_embedder.linear_2.", "t_embedder.mlp.2."),
               Entry("time_text_embed.text_embedder.linear_1.", "y_embedder.mlp.0."),
               Entry("time_text_embed.text_embedder.linear_2.", "y_embedder.mlp.2."),
               Entry("context_embedder.", "context_embedder."), Entry("proj_out.", "final_layer.linear."),
               Entry("norm_out.linear.", "final_layer.adaLN_modulation.1.", swapped=True)]
    for i in range(layers):
        d, x, c = f"transformer_blocks.{i}.", f"{MMDIT_BLOCKS}{i}.x_block.", f"{MMDIT_BLOCKS}{i}.context_block."
        names = [("attn.qkv.", f"{x}attn.qkv."), ("attn.norm_q.", f"{x}attn.ln_q."), ("attn.norm_k.", f"{x}attn.ln_k."),
                 ("attn.to_out.0.", f"{x}attn.proj."), ("attn2.qkv.", f"{x}attn2.qkv."),
                 ("attn2.norm_q.", f"{x}attn2.ln_q."), ("attn2.norm_k.", f"{x}attn2.ln_k."),
                 ("attn2.to_out.0.", f"{x}attn2.proj."), ("norm1.linear.", f"{x}adaLN_modulation.1."),
                 ("ff.net.0.proj.", f"{x}mlp.fc1."), ("ff.net.2.", f"{x}mlp.fc2."),
                 ("attn.add_qkv.", f"{c}attn.qkv."), ("attn.norm_added_q.", f"{c}attn.ln_q."),
                 ("attn.norm_added_k.", f"{c}attn.ln_k."), ("attn.to_add_out.", f"{c}attn.proj."),
                 ("ff_context.net.0.proj.", f"{c}mlp.fc1."), ("ff_context.net.2.", f"{c}mlp.fc2.")]
        entries += [Entry(d + a, b) for a, b in names]
        entries.append(Entry(f"{d}norm1_context.linear.", f"{c}adaLN_modulation.1.", swapped=i == layers - 1))
    return KeyTable(entries)


def fuse_mmdit_qkv(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Concatenate each attention's q, k, v projections into the one qkv projection of the original."""
    out = dict(sd)
    for key in sd:
        for split, fused in MMDIT_QKV:
            if split.format("q") in key:
                names = [key.replace(split.format("q"), split.format(p)) for p in "qkv"]
                if any(name not in sd for name in names):
                    raise key_error("MMDiT", "missing", [name for name in names if name not in sd])
                out[key.replace(split.format("q"), fused)] = torch.cat([out.pop(name) for name in names])
    return out


def split_mmdit_qkv(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Split each fused qkv projection into diffusers' q, k, v (thirds along the output dimension)."""
    out = dict(sd)
    for key in sd:
        for split, fused in MMDIT_QKV:
            if fused in key:
                for p, chunk in zip("qkv", out.pop(key).chunk(3)):
                    out[key.replace(fused, split.format(p))] = chunk.clone()
    return out


def mmdit_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The original MMDiT (model.diffusion_model. removed) in diffusers' SD3Transformer2DModel names."""
    table = mmdit_table(count_indices(sd, MMDIT_BLOCKS))
    return split_mmdit_qkv(table.convert(sd, to_original=False, part="MMDiT"))


def diffusers_to_mmdit(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of mmdit_to_diffusers."""
    table = mmdit_table(count_indices(sd, "transformer_blocks."))
    return table.convert(fuse_mmdit_qkv(sd), to_original=True, part="MMDiT")


# ---- Text encoders ----

def text_model_names(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """CLIP text encoder names with the "text_model." prefix (but CLIPTextModelWithProjection's text_projection,
    which lives beside the text model), without the position_ids buffer older files saved."""
    return {key if key.startswith(PROJECTION) else TEXT_MODEL + key.removeprefix(TEXT_MODEL): t
            for key, t in sd.items() if not key.endswith("position_ids")}


def open_clip_table(layers: int, projection: bool = False) -> KeyTable:
    """OpenCLIP text tower (resblocks, ln_1/ln_2, c_fc/c_proj, fused in_proj) <-> transformers CLIP names; with
    `projection`, also text_projection (a [width, dim] matrix in the file, a [dim, width] linear weight here)."""
    entries = [Entry(f"{TEXT_MODEL}embeddings.token_embedding.", "token_embedding."),
               Entry(f"{TEXT_MODEL}embeddings.position_embedding.weight", "positional_embedding"),
               Entry(f"{TEXT_MODEL}final_layer_norm.", "ln_final.")]
    if projection:
        entries.append(Entry(f"{PROJECTION}weight", "text_projection", transposed=True))
    for i in range(layers):
        d, o = f"{TEXT_MODEL}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        entries += [Entry(f"{d}layer_norm1.", f"{o}ln_1."), Entry(f"{d}layer_norm2.", f"{o}ln_2."),
                    Entry(f"{d}mlp.fc1.", f"{o}mlp.c_fc."), Entry(f"{d}mlp.fc2.", f"{o}mlp.c_proj."),
                    Entry(f"{d}self_attn.out_proj.", f"{o}attn.out_proj."),
                    Entry(f"{d}self_attn.in_proj.weight", f"{o}attn.in_proj_weight"),
                    Entry(f"{d}self_attn.in_proj.bias", f"{o}attn.in_proj_bias")]
    return KeyTable(entries)


def fuse_qkv(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Concatenate q_proj, k_proj, v_proj into one in_proj (OpenCLIP's nn.MultiheadAttention layout)."""
    out = {k: t for k, t in sd.items() if not any(f"self_attn.{p}_proj." in k for p in "qkv")}
    for key in sd:
        if ".self_attn.q_proj." in key:
            out[key.replace("q_proj", "in_proj")] = torch.cat([sd[key.replace("q_proj", f"{p}_proj")] for p in "qkv"])
    return out


def split_qkv(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Split a fused in_proj into q_proj, k_proj, v_proj (thirds along the output dimension)."""
    out = {k: t for k, t in sd.items() if ".self_attn.in_proj." not in k}
    for key, tensor in sd.items():
        if ".self_attn.in_proj." in key:
            for p, chunk in zip("qkv", tensor.chunk(3)):
                out[key.replace("in_proj", f"{p}_proj")] = chunk.clone()
    return out


def open_clip_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """SD 2.x text encoder: diffusers keeps the layers the model uses (all but the last, "penultimate")
    and the final layer norm; the unused last resblock, text_projection and logit_scale are dropped."""
    layers = count_indices(sd, "transformer.resblocks.") - 1
    last = f"transformer.resblocks.{layers}."
    kept = {k: t for k, t in sd.items() if not k.startswith(last) and k not in ("text_projection", "logit_scale")}
    return split_qkv(open_clip_table(layers).convert(kept, to_original=False, part="text encoder (OpenCLIP)"))


def open_clip_projection_to_transformers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """SDXL's OpenCLIP ViT-bigG -> transformers' CLIPTextModelWithProjection: every layer is used (the penultimate
    states for the context, the last for the pooled output) and text_projection is kept; logit_scale is dropped."""
    table = open_clip_table(count_indices(sd, "transformer.resblocks."), projection=True)
    kept = {k: t for k, t in sd.items() if k != "logit_scale"}
    return split_qkv(table.convert(kept, to_original=False, part="text encoder 2 (OpenCLIP bigG)"))


def transformers_to_open_clip_projection(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of open_clip_projection_to_transformers."""
    sd = text_model_names(sd)
    table = open_clip_table(count_indices(sd, f"{TEXT_MODEL}encoder.layers."), projection=True)
    return table.convert(fuse_qkv(sd), to_original=True, part="text encoder 2 (OpenCLIP bigG)")


def diffusers_to_open_clip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of open_clip_to_diffusers. The dropped last resblock is written as zeros, which makes it the
    identity (x + 0 + 0), and text_projection as the identity matrix, so the file runs the same either way."""
    sd = text_model_names(sd)
    layers = count_indices(sd, f"{TEXT_MODEL}encoder.layers.")
    out = open_clip_table(layers).convert(fuse_qkv(sd), to_original=True, part="text encoder (OpenCLIP)")
    before = f"transformer.resblocks.{layers - 1}."
    for key in [k for k in out if k.startswith(before)]:
        out[f"transformer.resblocks.{layers}." + key[len(before):]] = torch.zeros_like(out[key])
    width = out["positional_embedding"].shape[1]
    out["text_projection"] = torch.eye(width, dtype=out["positional_embedding"].dtype)
    return out


# ---- Whole files ----

def split_prefix(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The keys under prefix, with the prefix removed."""
    return {key[len(prefix):]: t for key, t in sd.items() if key.startswith(prefix)}


# The text encoders of each family in an original file: (prefix, part, reader to transformers names, writer back).
SD1_TEXT_ENCODER = (CLIP_PREFIX, "text_encoder", text_model_names, text_model_names)
SD2_TEXT_ENCODER = (OPEN_CLIP_PREFIX, "text_encoder", open_clip_to_diffusers, diffusers_to_open_clip)
SDXL_TEXT_ENCODERS = [(SDXL_CLIP_PREFIX, "text_encoder", text_model_names, text_model_names),
                      (SDXL_OPEN_CLIP_PREFIX, "text_encoder_2", open_clip_projection_to_transformers,
                       transformers_to_open_clip_projection)]
REFINER_TEXT_ENCODERS = [(REFINER_OPEN_CLIP_PREFIX, "text_encoder_2", open_clip_projection_to_transformers,
                          transformers_to_open_clip_projection)]
TEXT_ENCODERS = [SD1_TEXT_ENCODER, SD2_TEXT_ENCODER, *SDXL_TEXT_ENCODERS, *REFINER_TEXT_ENCODERS]


def sd3_clip_to_transformers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """An SD3 file's CLIP encoder in transformers' CLIPTextModelWithProjection names, without the logit_scale some
    files keep. Stability's files leave out CLIP-L's text_projection, which SD3 does not apply to CLIP-L's pooled
    output: it becomes the identity matrix (what diffusers' SD3 folders hold)."""
    sd = text_model_names({k: t for k, t in sd.items() if k != "logit_scale"})
    if PROJECTION + "weight" not in sd:
        width = sd[f"{TEXT_MODEL}final_layer_norm.weight"].shape[0]
        sd[PROJECTION + "weight"] = torch.eye(width, dtype=sd[f"{TEXT_MODEL}final_layer_norm.weight"].dtype)
    return sd


def transformers_to_sd3_clip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of sd3_clip_to_transformers: an identity text_projection is left out, as in Stability's files."""
    sd = text_model_names(sd)
    projection = sd.get(PROJECTION + "weight")
    if projection is not None and torch.equal(projection, torch.eye(*projection.shape, dtype=projection.dtype)):
        del sd[PROJECTION + "weight"]
    return sd


def t5_names(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """T5's weights with the token embedding once, as shared.weight (encoder.embed_tokens is transformers' tied copy,
    which some files keep too or instead)."""
    out = {k: t for k, t in sd.items() if k != "encoder.embed_tokens.weight"}
    if "shared.weight" not in out and "encoder.embed_tokens.weight" in sd:
        out["shared.weight"] = sd["encoder.embed_tokens.weight"]
    return out


SD3_TEXT_ENCODERS = [(SD3_CLIP_L_PREFIX, "text_encoder", sd3_clip_to_transformers, transformers_to_sd3_clip),
                     (SD3_CLIP_G_PREFIX, "text_encoder_2", sd3_clip_to_transformers, transformers_to_sd3_clip),
                     (SD3_T5_PREFIX, "text_encoder_3", t5_names, dict)]


def written_text_encoders(parts: dict[str, dict[str, Tensor]], open_clip: bool | None) -> list[tuple]:
    """The TEXT_ENCODERS rows a file of these parts holds: SDXL's pair, the refiner's bigG, or SD's one encoder
    (OpenCLIP when open_clip is True; default: when its width is 1024, as in SD 2.x)."""
    if "text_encoder_2" in parts:
        return SDXL_TEXT_ENCODERS if "text_encoder" in parts else REFINER_TEXT_ENCODERS
    if "text_encoder" not in parts:
        return []
    if open_clip is None:
        open_clip = text_model_names(parts["text_encoder"])[f"{TEXT_MODEL}embeddings.token_embedding.weight"
                                                            ].shape[1] == 1024
    return [SD2_TEXT_ENCODER if open_clip else SD1_TEXT_ENCODER]


def original_to_diffusers(sd: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Original single-file state dict -> {"unet", "vae", "text_encoder"[, "text_encoder_2"]} (SD3: "transformer",
    "vae"[, "text_encoder", "text_encoder_2", "text_encoder_3"]) in diffusers / transformers names. EMA copies
    (model_ema.*), the schedule buffers and other non-model keys are skipped."""
    network = split_prefix(sd, UNET_PREFIX)
    if not network:
        raise NanoDiffusionError(f"no UNet weights (keys starting with {UNET_PREFIX!r}): not a Stable Diffusion "
                                 "checkpoint; pass a full SD 1.x / 2.x / XL / SD3 file or a diffusers folder")
    sd3 = MMDIT_PATCHES in network
    parts = ({"transformer": mmdit_to_diffusers(network)} if sd3 else
             {"unet": unet_table(UNetLayout.from_original(network)).convert(network, to_original=False, part="UNet")})
    vae = {k: t for k, t in split_prefix(sd, VAE_PREFIX).items() if not k.startswith("loss.")}
    if vae:
        parts["vae"] = vae_table_for(vae, original=True).convert(vae, to_original=False, part="VAE")
    for prefix, part, read, _ in SD3_TEXT_ENCODERS if sd3 else TEXT_ENCODERS:
        if has_prefix(sd, prefix):
            parts[part] = read(split_prefix(sd, prefix))
    if has_prefix(sd, LAYOUT_PREFIX):
        parts["layout"] = split_prefix(sd, LAYOUT_PREFIX)
    return parts


def diffusers_to_original(parts: dict[str, dict[str, Tensor]], *, open_clip: bool | None = None) -> dict[str, Tensor]:
    """{"unet", "vae", "text_encoder"[, "text_encoder_2"]} (or SD3's parts) -> one original single-file state dict.
    An SD text encoder is written in OpenCLIP layout when open_clip is True (default: when its width is 1024, as in
    SD 2.x)."""
    if "transformer" in parts:
        network = diffusers_to_mmdit(parts["transformer"])
        encoders = [row for row in SD3_TEXT_ENCODERS if row[1] in parts]
    else:
        unet = parts["unet"]
        network = unet_table(UNetLayout.from_diffusers(unet)).convert(unet, to_original=True, part="UNet")
        encoders = written_text_encoders(parts, open_clip)
    sd = {UNET_PREFIX + k: t for k, t in network.items()}
    if "vae" in parts:
        vae = vae_table_for(parts["vae"], original=False).convert(parts["vae"], to_original=True, part="VAE")
        sd.update({VAE_PREFIX + k: t for k, t in vae.items()})
    sd.update({LAYOUT_PREFIX + k: t for k, t in parts.get("layout", {}).items()})
    for prefix, part, _, write in encoders:
        sd.update({prefix + k: t for k, t in write(parts[part]).items()})
    return sd
