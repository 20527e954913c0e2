"""OpenAI guided-diffusion (ADM) architecture as a diffusers ``UNet2DModel``: flags, layer names, schedule.

The architecture comes from a preset of the official SAG README models (:data:`ADM_PRESETS`) and/or
guided-diffusion's command-line flags (same names: ``image_size``, ``num_channels``,
``attention_resolutions="32,16,8"``, ``num_head_channels``, ...). :func:`adm_modules` is the one walk over
ADM's block numbering (``input_blocks.<k>`` / ``middle_block`` / ``output_blocks.<k>``) -> diffusers module
names; layer names, heads and the weight conversion in :mod:`sag.models.adm_weights` (``load_adm``,
``convert_adm_state_dict``; it imports this module, never the reverse) all read it.

Architecture correspondence (guided-diffusion ``unet.py`` -> diffusers):

* ``ResBlock`` with ``use_scale_shift_norm`` -> ``ResnetBlock2D(time_embedding_norm="scale_shift")``;
  ``resblock_updown`` -> ``downsample_type/upsample_type="resnet"`` and ``ResnetDownsampleBlock2D`` /
  ``ResnetUpsampleBlock2D`` at levels without attention (their ``h_upd``/``x_upd`` pooling has no weights).
* ``AttentionBlock`` -> diffusers ``Attention``: ``norm`` -> ``group_norm``, the ``qkv`` conv1d (3C, C, 1)
  -> ``to_q/to_k/to_v`` (legacy order: per head [q, k, v] blocks; ``use_new_attention_order``: [Q, K, V]),
  ``proj_out`` -> ``to_out.0``. The scale 1/sqrt(sqrt(ch)) on q and k equals SDPA's 1/sqrt(ch).
* ``timestep_embedding`` ([cos, sin], exponent / half) -> ``flip_sin_to_cos=True, freq_shift=0``.

Heads: with ``num_head_channels`` (the 256-px models) every layer has C / 64 heads, which the diffusers
config expresses (``attention_head_dim`` is the per-head dim). With ``num_heads`` (ImageNet-128: 4 heads at
every width) the per-head dim varies by level, which ``UNet2DModel``'s single ``attention_head_dim`` cannot
express: :func:`build_adm_unet` sets each layer's ``heads`` after construction (:func:`adm_attention_heads`).
A ``save_pretrained`` copy of such a net reloads with the config's heads, not ADM's.

Layer names for SAG: :func:`ADM_LAYER_NAMES` maps ``"output_blocks.<d>"`` (the official
``--sel_attn_block output --sel_attn_depth d``), ``"middle_block"`` and ``"input_blocks.<d>"`` to the
diffusers ``Attention`` module name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention

from sag.errors import SagConfigError

NUM_CLASSES = 1000  # guided-diffusion's ImageNet class count

# guided-diffusion ``script_util.model_and_diffusion_defaults()`` (+ ``num_classes``, ``in_channels``).
ADM_DEFAULTS: dict[str, Any] = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "num_heads": 4,
    "num_heads_upsample": -1,
    "num_head_channels": -1,
    "attention_resolutions": "16,8",
    "channel_mult": "",
    "dropout": 0.0,
    "class_cond": False,
    "num_classes": NUM_CLASSES,
    "use_checkpoint": False,
    "use_scale_shift_norm": True,
    "resblock_updown": False,
    "use_fp16": False,
    "use_new_attention_order": False,
    "learn_sigma": False,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
    "in_channels": 3,
}

_COMMON_256 = {
    "image_size": 256,
    "num_channels": 256,
    "num_res_blocks": 2,
    "attention_resolutions": "32,16,8",
    "num_head_channels": 64,
    "learn_sigma": True,
    "resblock_updown": True,
    "use_scale_shift_norm": True,
    "use_fp16": True,
    "diffusion_steps": 1000,
    "noise_schedule": "linear",
}

# The official SAG README models (guided-diffusion's README flags). use_fp16 does not matter here: the
# released state dicts are float32 and are loaded in the requested dtype.
ADM_PRESETS: dict[str, dict[str, Any]] = {
    # 128x128_diffusion.pt
    "imagenet128_cond": {
        "image_size": 128,
        "num_channels": 256,
        "num_res_blocks": 2,
        "attention_resolutions": "32,16,8",
        "num_heads": 4,
        "learn_sigma": True,
        "class_cond": True,
        "resblock_updown": True,
        "use_scale_shift_norm": True,
        "use_fp16": True,
        "diffusion_steps": 1000,
        "noise_schedule": "linear",
    },
    # 256x256_diffusion.pt
    "imagenet256_cond": dict(_COMMON_256, class_cond=True),
    # 256x256_diffusion_uncond.pt
    "imagenet256_uncond": dict(_COMMON_256, class_cond=False),
    # lsun_cat.pt / lsun_horse.pt (lsun_horse_nodropout.pt: dropout 0.0, same weights layout)
    "lsun256": dict(_COMMON_256, class_cond=False, dropout=0.1),
}

# guided-diffusion ``create_model``: channel_mult by image size when channel_mult == "".
DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}
NOISE_SCHEDULES = ("linear", "cosine")


# --- flags ------------------------------------------------------------------------------------------------
def _parse_ints(value: Any, what: str) -> tuple[int, ...]:
    try:
        if isinstance(value, str):
            return tuple(int(v) for v in value.split(",") if v.strip())
        if isinstance(value, int | float):
            return (int(value),)
        return tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise SagConfigError(f"ADM flag {what}={value!r}; accepted: comma-separated integers (e.g. '32,16,8') "
                             "or a list of integers") from None


def adm_flags(preset: str | Mapping[str, Any] | None = None, **flags: Any) -> dict[str, Any]:
    """Complete, normalised guided-diffusion flags: defaults <- preset <- ``flags``.

    ``preset`` is a key of :data:`ADM_PRESETS`, a flags mapping, or None (guided-diffusion's defaults).
    ``channel_mult`` becomes a tuple (the per-size default when ``""``), ``attention_resolutions`` a tuple of
    resolutions in pixels (as on guided-diffusion's command line, not downsampling factors).
    """
    if isinstance(preset, str):
        if preset not in ADM_PRESETS:
            raise SagConfigError(f"ADM preset {preset!r} is unknown; accepted: {sorted(ADM_PRESETS)}")
        base = ADM_PRESETS[preset]
    elif preset is None:
        base = {}
    else:
        base = dict(preset)
    merged = dict(base, **flags)
    unknown = sorted(set(merged) - set(ADM_DEFAULTS))
    if unknown:
        raise SagConfigError(f"ADM flag(s) {unknown} unknown; accepted: {sorted(ADM_DEFAULTS)}")
    f = dict(ADM_DEFAULTS, **merged)
    size = int(f["image_size"])
    f["image_size"] = size
    mult = f["channel_mult"]
    if mult in ("", None, ()):
        if size not in DEFAULT_CHANNEL_MULT:
            raise SagConfigError(f"ADM image_size={size} has no default channel_mult; accepted sizes "
                                 f"{sorted(DEFAULT_CHANNEL_MULT)} or an explicit channel_mult")
        mult = DEFAULT_CHANNEL_MULT[size]
    elif isinstance(mult, str):
        try:
            mult = tuple(float(v) if "." in v else int(v) for v in mult.split(",") if v.strip())
        except ValueError:
            raise SagConfigError(f"ADM flag channel_mult={mult!r}; accepted: e.g. '1,1,2,3,4'") from None
    f["channel_mult"] = tuple(mult)
    f["attention_resolutions"] = _parse_ints(f["attention_resolutions"], "attention_resolutions")
    for k in ("num_channels", "num_res_blocks", "num_heads", "num_heads_upsample", "num_head_channels",
              "num_classes", "diffusion_steps", "in_channels"):
        f[k] = int(f[k])
    for k in ("class_cond", "learn_sigma", "resblock_updown", "use_scale_shift_norm", "use_new_attention_order",
              "use_fp16", "use_checkpoint"):
        f[k] = bool(f[k])
    f["dropout"] = float(f["dropout"])
    if f["num_heads_upsample"] == -1:
        f["num_heads_upsample"] = f["num_heads"]
    if f["noise_schedule"] not in NOISE_SCHEDULES:
        raise SagConfigError(f"ADM noise_schedule {f['noise_schedule']!r}; accepted: {list(NOISE_SCHEDULES)}")
    if f["channel_mult"][0] != 1:
        raise SagConfigError(f"ADM channel_mult={f['channel_mult']} (first multiplier != 1, e.g. the 512-px "
                             "model) is not expressible as a diffusers UNet2DModel: its timestep embedding "
                             "width is tied to the first block's channels; accepted: channel_mult[0] == 1")
    return f


def _levels(f: Mapping[str, Any]) -> tuple[list[int], list[bool]]:
    """(channels per level, attention per level) as in guided-diffusion's ``UNetModel.__init__``."""
    chans = [int(m * f["num_channels"]) for m in f["channel_mult"]]
    attn_ds = {f["image_size"] // r for r in f["attention_resolutions"] if r > 0}
    return chans, [2**level in attn_ds for level in range(len(chans))]


def _heads(f: Mapping[str, Any], channels: int, upsample: bool) -> int:
    if f["num_head_channels"] != -1:
        if channels % f["num_head_channels"]:
            raise SagConfigError(f"ADM num_head_channels={f['num_head_channels']} does not divide the {channels} "
                                 "channels of an attention layer")
        return channels // f["num_head_channels"]
    heads = f["num_heads_upsample"] if upsample else f["num_heads"]
    if heads < 1 or channels % heads:
        raise SagConfigError(f"ADM num_heads={heads} does not divide the {channels} channels of an attention layer")
    return heads


# --- the block numbering ----------------------------------------------------------------------------------
class AdmModule(NamedTuple):
    """One module of guided-diffusion's ``input_blocks`` / ``middle_block`` / ``output_blocks`` and its diffusers
    counterpart. ``kind``: ``"resnet"`` (ResBlock -> ResnetBlock2D), ``"attention"`` (AttentionBlock ->
    Attention) or ``"conv"`` (a conv with weight and bias: the input conv, conv down/upsampling)."""

    block: str  # the ADM block, as the official SAG code names it: "input_blocks.4", "middle_block"
    adm: str  # its module prefix in the ADM state dict: "input_blocks.4.1"
    diffusers: str  # the diffusers module prefix: "down_blocks.1.attentions.1"
    kind: str
    channels: int = 0  # attention only
    heads: int = 0  # attention only


def adm_modules(flags: str | Mapping[str, Any] | None) -> list[AdmModule]:
    """Every module of the ADM block numbering -> diffusers name, in forward order.

    The one walk over guided-diffusion's ``UNetModel.__init__`` numbering: input block ``k`` counts ResBlocks and
    Downsamples; output block ``k`` holds a ResBlock, then an AttentionBlock at attention levels, then the
    level's Upsample after its last ResBlock. Layer names, heads and the weight conversion all read it.
    """
    f = adm_flags(flags)
    chans, attn = _levels(f)
    n, nrb, updown = len(chans), f["num_res_blocks"], f["resblock_updown"]

    def attention(block: str, dst: str, level: int, upsample: bool) -> AdmModule:
        return AdmModule(block, f"{block}.1", dst, "attention", chans[level], _heads(f, chans[level], upsample))

    def resample(block: str, sub: int, dst: str, conv: str) -> AdmModule:
        # resblock_updown: a ResBlock(down/up=True); else a conv (Downsample.op / Upsample.conv)
        if updown:
            return AdmModule(block, f"{block}.{sub}", dst, "resnet")
        return AdmModule(block, f"{block}.{sub}.{conv}", f"{dst}.conv", "conv")

    out = [AdmModule("input_blocks.0", "input_blocks.0.0", "conv_in", "conv")]
    k = 1
    for level in range(n):
        for j in range(nrb):
            b = f"input_blocks.{k}"
            out.append(AdmModule(b, f"{b}.0", f"down_blocks.{level}.resnets.{j}", "resnet"))
            if attn[level]:
                out.append(attention(b, f"down_blocks.{level}.attentions.{j}", level, False))
            k += 1
        if level != n - 1:
            out.append(resample(f"input_blocks.{k}", 0, f"down_blocks.{level}.downsamplers.0", "op"))
            k += 1
    out += [AdmModule("middle_block", "middle_block.0", "mid_block.resnets.0", "resnet"),
            attention("middle_block", "mid_block.attentions.0", n - 1, False),
            AdmModule("middle_block", "middle_block.2", "mid_block.resnets.1", "resnet")]
    k = 0
    for u, level in enumerate(reversed(range(n))):
        for i in range(nrb + 1):
            b = f"output_blocks.{k}"
            out.append(AdmModule(b, f"{b}.0", f"up_blocks.{u}.resnets.{i}", "resnet"))
            if attn[level]:
                out.append(attention(b, f"up_blocks.{u}.attentions.{i}", level, True))
            if level and i == nrb:  # the Upsample follows the ResBlock (and the AttentionBlock) of block k
                out.append(resample(b, 1 + attn[level], f"up_blocks.{u}.upsamplers.0", "conv"))
            k += 1
    return out


def _attention_modules(flags: str | Mapping[str, Any] | None) -> list[AdmModule]:
    return [m for m in adm_modules(flags) if m.kind == "attention"]


# --- diffusers config -------------------------------------------------------------------------------------
def adm_unet_config(flags: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """``UNet2DModel`` keyword arguments reproducing guided-diffusion's ``UNetModel`` for these flags."""
    f = adm_flags(flags)
    chans, attn = _levels(f)
    updown = f["resblock_updown"]
    plain_down = "ResnetDownsampleBlock2D" if updown else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if updown else "UpBlock2D"
    head_dims = {m.channels // m.heads for m in _attention_modules(f)}
    # per-head dim: exact when constant (num_head_channels); else set per layer by build_adm_unet
    head_dim = head_dims.pop() if len(head_dims) == 1 else None
    return {
        "sample_size": f["image_size"],
        "in_channels": f["in_channels"],
        "out_channels": 2 * f["in_channels"] if f["learn_sigma"] else f["in_channels"],
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "time_embedding_dim": 4 * f["num_channels"],
        "freq_shift": 0,
        "flip_sin_to_cos": True,
        "down_block_types": tuple("AttnDownBlock2D" if a else plain_down for a in attn),
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": tuple("AttnUpBlock2D" if a else plain_up for a in reversed(attn)),
        "block_out_channels": tuple(chans),
        "layers_per_block": f["num_res_blocks"],
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": "resnet" if updown else "conv",
        "upsample_type": "resnet" if updown else "conv",
        "dropout": f["dropout"],
        "act_fn": "silu",
        "attention_head_dim": head_dim,
        "norm_num_groups": 32,
        "attn_norm_num_groups": 32,  # else the mid-block attention has no GroupNorm with scale_shift
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if f["use_scale_shift_norm"] else "default",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": f["num_classes"] if f["class_cond"] else None,
    }


def ADM_LAYER_NAMES(flags: str | Mapping[str, Any] | None) -> dict[str, str]:  # noqa: N802 (constant-like table)
    """``"output_blocks.<d>"`` / ``"middle_block"`` / ``"input_blocks.<d>"`` -> diffusers Attention name.

    Only blocks holding an attention layer appear. ``--sel_attn_block output --sel_attn_depth d`` of the
    official SAG code is ``ADM_LAYER_NAMES(preset)[f"output_blocks.{d}"]``.
    """
    return {m.block: m.diffusers for m in _attention_modules(flags)}


def adm_attention_heads(flags: str | Mapping[str, Any] | None) -> dict[str, int]:
    """Diffusers Attention name -> ADM's number of heads at that layer."""
    return {m.diffusers: m.heads for m in _attention_modules(flags)}


def _set_heads(net: UNet2DModel, f: Mapping[str, Any]) -> None:
    modules = dict(net.named_modules())
    for m in _attention_modules(f):
        attn = modules[m.diffusers]
        assert isinstance(attn, Attention), m.diffusers
        attn.heads = m.heads
        attn.sliceable_head_dim = m.heads
        if attn.scale_qk:
            attn.scale = (m.channels // m.heads) ** -0.5


def build_adm_unet(flags: str | Mapping[str, Any] | None, device: str | torch.device | None = None) -> UNet2DModel:
    """The diffusers ``UNet2DModel`` for these flags (random weights), with ADM's heads at every layer.

    ``device="meta"`` builds it without allocating weights (for shapes, or ``load_state_dict(assign=True)``).
    """
    f = adm_flags(flags)
    cfg = adm_unet_config(f)
    if device is None:
        net = UNet2DModel(**cfg)
    else:
        with torch.device(device):
            net = UNet2DModel(**cfg)
    _set_heads(net, f)
    return net


# --- schedule ---------------------------------------------------------------------------------------------
def adm_betas(diffusion_steps: int = 1000, noise_schedule: str = "linear") -> np.ndarray:
    """guided-diffusion ``get_named_beta_schedule`` (float64)."""
    if noise_schedule == "linear":
        scale = 1000 / diffusion_steps
        return np.linspace(scale * 0.0001, scale * 0.02, diffusion_steps, dtype=np.float64)
    if noise_schedule == "cosine":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        steps = diffusion_steps
        return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)],
                        dtype=np.float64)
    raise SagConfigError(f"ADM noise_schedule {noise_schedule!r}; accepted: {list(NOISE_SCHEDULES)}")


def adm_scheduler_config(f: Mapping[str, Any]) -> dict[str, Any]:
    """The diffusers scheduler entries equal to guided-diffusion's training schedule."""
    steps = int(f["diffusion_steps"])
    if f["noise_schedule"] == "linear":
        scale = 1000 / steps
        return {"num_train_timesteps": steps, "beta_start": scale * 0.0001, "beta_end": scale * 0.02,
                "beta_schedule": "linear"}
    return {"num_train_timesteps": steps, "beta_schedule": "squaredcos_cap_v2"}


__all__ = [
    "ADM_DEFAULTS",
    "ADM_LAYER_NAMES",
    "ADM_PRESETS",
    "AdmModule",
    "adm_attention_heads",
    "adm_betas",
    "adm_flags",
    "adm_modules",
    "adm_scheduler_config",
    "adm_unet_config",
    "build_adm_unet",
]
