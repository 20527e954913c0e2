"""Converting guided-diffusion (ADM) state dicts to diffusers ``UNet2DModel`` names, and loading them.

``load_adm(path, preset)`` reads a guided-diffusion ``UNetModel`` state dict (``torch.load`` with
``weights_only=True``: a pickle that would run code is refused), converts every tensor to diffusers names
and returns a :class:`~sag.models.base.DiffusionModel`. The tensor names follow the block numbering of
:func:`sag.models.adm.adm_modules`; see :mod:`sag.models.adm` for the architecture correspondence and presets.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import Tensor

from sag.errors import SagConfigError
from sag.models.adm import (
    ADM_PRESETS,
    adm_betas,
    adm_flags,
    adm_modules,
    adm_scheduler_config,
    build_adm_unet,
)
from sag.models.base import DiffusionModel
from sag.schedule import space_timesteps

Shapes = Mapping[str, tuple[int, ...]]  # diffusers tensor name -> shape

# --- state dict conversion --------------------------------------------------------------------------------
_RES_PARTS = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
)


class _Rule:
    """Source ADM tensors -> target diffusers tensors: expected source shapes and the transform."""

    def __init__(self, src: dict[str, tuple[int, ...]], dst: tuple[str, ...], fn: Callable[..., tuple[Tensor, ...]]):
        self.src, self.dst, self.fn = src, dst, fn


def _identity(*ts: Tensor) -> tuple[Tensor, ...]:
    return ts


def _plain(target: Shapes, src: str, dst: str, params: Iterable[str] = ("weight", "bias")) -> list[_Rule]:
    """Tensors copied as they are (same shape under a new name)."""
    return [_Rule({f"{src}.{p}": target[f"{dst}.{p}"]}, (f"{dst}.{p}",), _identity) for p in params]


def _resnet(target: Shapes, src: str, dst: str) -> list[_Rule]:
    """ResBlock -> ResnetBlock2D (the 1x1 ``skip_connection`` only where channels change)."""
    rules = [r for a, b in _RES_PARTS for r in _plain(target, f"{src}.{a}", f"{dst}.{b}")]
    if f"{dst}.conv_shortcut.weight" in target:
        rules += _plain(target, f"{src}.skip_connection", f"{dst}.conv_shortcut")
    return rules


def _attention(target: Shapes, src: str, dst: str, heads: int, legacy_order: bool) -> list[_Rule]:
    """AttentionBlock -> Attention: ``norm`` -> ``group_norm``, ``qkv`` conv1d split into to_q/to_k/to_v,
    ``proj_out`` conv1d -> ``to_out.0`` linear."""
    c = target[f"{dst}.to_q.weight"][0]

    def split(t: Tensor) -> tuple[Tensor, ...]:
        # legacy: output channel = head * 3ch + {q,k,v} * ch + i; new order: {q,k,v} * C + head * ch + i
        rest = t.shape[1:]
        parts = t.reshape(heads, 3, c // heads, *rest).transpose(0, 1) if legacy_order else t.reshape(3, c, *rest)
        return tuple(p.reshape(c, *rest).clone() for p in parts)

    def qkv_weight(w: Tensor) -> tuple[Tensor, ...]:
        return split(w[..., 0])

    return [
        *_plain(target, f"{src}.norm", f"{dst}.group_norm"),
        _Rule({f"{src}.qkv.weight": (3 * c, c, 1)}, tuple(f"{dst}.to_{x}.weight" for x in "qkv"), qkv_weight),
        _Rule({f"{src}.qkv.bias": (3 * c,)}, tuple(f"{dst}.to_{x}.bias" for x in "qkv"), split),
        _Rule({f"{src}.proj_out.weight": (c, c, 1)}, (f"{dst}.to_out.0.weight",), lambda w: (w[..., 0].clone(),)),
        *_plain(target, f"{src}.proj_out", f"{dst}.to_out.0", ("bias",)),
    ]


def _rules(f: Mapping[str, Any], target: Shapes) -> list[_Rule]:
    """Every conversion rule, in the order of guided-diffusion's state dict."""
    rules = _plain(target, "time_embed.0", "time_embedding.linear_1") + _plain(target, "time_embed.2",
                                                                               "time_embedding.linear_2")
    if f["class_cond"]:
        rules += _plain(target, "label_emb", "class_embedding", ("weight",))
    for m in adm_modules(f):
        if m.kind == "resnet":
            rules += _resnet(target, m.adm, m.diffusers)
        elif m.kind == "attention":
            rules += _attention(target, m.adm, m.diffusers, m.heads, legacy_order=not f["use_new_attention_order"])
        else:
            rules += _plain(target, m.adm, m.diffusers)
    return rules + _plain(target, "out.0", "conv_norm_out") + _plain(target, "out.2", "conv_out")


@lru_cache(maxsize=32)
def _target_shapes_cached(key: tuple[tuple[str, Any], ...]) -> dict[str, tuple[int, ...]]:
    net = build_adm_unet(dict(key), device="meta")
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _target_shapes(f: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Diffusers tensor shapes for normalised flags (a meta-device build, cached)."""
    return dict(_target_shapes_cached(tuple(sorted(f.items()))))


def adm_state_dict_shapes(flags: str | Mapping[str, Any] | None) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of guided-diffusion's ``UNetModel`` state dict for these flags."""
    f = adm_flags(flags)
    return {k: s for r in _rules(f, _target_shapes(f)) for k, s in r.src.items()}


def _matching_presets(state_dict: Mapping[str, Any]) -> list[str]:
    got = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, Tensor)}
    return [p for p in ADM_PRESETS if adm_state_dict_shapes(p) == got]


def _describe(f: Mapping[str, Any]) -> str:
    keys = ("image_size", "num_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "class_cond",
            "learn_sigma", "resblock_updown", "use_scale_shift_norm")
    return ", ".join(f"{k}={f[k]}" for k in keys)


def _mismatch(source: str, f: Mapping[str, Any], preset_name: str | None, detail: str,
              state_dict: Mapping[str, Any]) -> SagConfigError:
    which = f"preset {preset_name!r}" if preset_name else "the flags"
    try:
        matches = _matching_presets(state_dict)
    except Exception:  # the hint is best-effort
        matches = []
    hint = (f"; the weights match preset(s) {matches}" if matches
            else "; set model.preset / the flags (num_channels, channel_mult, attention_resolutions, class_cond, "
                 "learn_sigma, resblock_updown, ...) to those the checkpoint was trained with")
    return SagConfigError(f"{source}: a config that does not match the weights ({which}: {_describe(f)}): "
                          f"{detail}{hint}")


def convert_adm_state_dict(
    state_dict: Mapping[str, Tensor],
    flags: str | Mapping[str, Any] | None,
    source: str = "state dict",
) -> dict[str, Tensor]:
    """guided-diffusion ``UNetModel`` state dict -> ``UNet2DModel`` state dict (for ``adm_unet_config(flags)``).

    Every source tensor must be used and every target tensor filled, with the expected shapes; otherwise a
    :class:`SagConfigError` names ``source``, the first offending key, expected and got shapes.
    """
    preset_name = flags if isinstance(flags, str) else None
    f = adm_flags(flags)
    target = _target_shapes(f)
    rules = _rules(f, target)
    expected = {k: s for r in rules for k, s in r.src.items()}
    got = dict(state_dict)
    bad_type = [k for k, v in got.items() if not isinstance(v, Tensor)]
    if bad_type:
        raise SagConfigError(f"{source}: entry {bad_type[0]!r} is a {type(got[bad_type[0]]).__name__}, not a "
                             "tensor; expected a guided-diffusion UNetModel state dict")
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    wrong = [k for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k])]
    if wrong:
        k = wrong[0]
        more = f" (+{len(wrong) - 1} more shape mismatches)" if len(wrong) > 1 else ""
        detail = f"{k} expected shape {tuple(expected[k])}, got {tuple(got[k].shape)}{more}"
        raise _mismatch(source, f, preset_name, detail, got)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} expected tensor(s) missing, e.g. {missing[0]} {tuple(expected[missing[0]])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]} "
                         f"{tuple(got[unexpected[0]].shape)}")
        raise _mismatch(source, f, preset_name, "; ".join(parts), got)
    out: dict[str, Tensor] = {}
    for r in rules:
        values = r.fn(*(got[k] for k in r.src))
        for name, v in zip(r.dst, values, strict=True):
            if name in out or tuple(v.shape) != target[name]:  # a converter bug, not a user error
                raise RuntimeError(f"ADM converter: {name} produced twice or shape {tuple(v.shape)} != "
                                   f"{target[name]}")
            out[name] = v
    unfilled = sorted(set(target) - set(out))
    if unfilled:
        raise RuntimeError(f"ADM converter: {len(unfilled)} diffusers tensors not filled, e.g. {unfilled[0]}")
    return out


# --- loading ----------------------------------------------------------------------------------------------
LAYOUT = "a guided-diffusion (ADM) UNetModel state dict saved with torch.save (.pt), or a .safetensors file"


_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _first_line(e: BaseException) -> str:
    """The informative line of an error (weights_only refusals put the reason after boilerplate)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(_BOILERPLATE)]
    return (useful or lines or [type(e).__name__])[0]


def read_adm_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint file, refusing pickles that hold anything but tensors and containers."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SagConfigError(f"model.path {str(p)!r} does not exist; expected {LAYOUT}")
    if not p.is_file():
        raise SagConfigError(f"model.path {str(p)!r} is not a file; expected {LAYOUT}")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorsError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(p), device="cpu")
        except (SafetensorsError, OSError, RuntimeError, ValueError) as e:
            raise SagConfigError(f"{p}: not a readable safetensors file ({_first_line(e)}); expected {LAYOUT}"
                                 ) from None
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise SagConfigError(f"{p}: refused by torch.load(weights_only=True), which loads only tensors and "
                                 f"containers and never runs code from the file ({_first_line(e)}); a pickle with "
                                 f"other objects, or a truncated file; expected {LAYOUT}") from None
        except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, UnicodeDecodeError) as e:
            raise SagConfigError(f"{p}: cannot read the checkpoint, the file is truncated or corrupt "
                                 f"({_first_line(e)}); expected {LAYOUT}") from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "ema"):  # common training-checkpoint wrappers
            if key in obj and isinstance(obj[key], Mapping) and all(isinstance(v, Tensor) for v in obj[key].values()):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise SagConfigError(f"{p}: holds a {type(obj).__name__}{' (empty)' if not obj else ''}, not a state "
                             f"dict; expected {LAYOUT}")
    sd = {str(k): v for k, v in obj.items()}
    if sd and all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_adm(
    path: str,
    preset: str | None = None,
    dtype: str = "float32",
    clip_denoised: bool = True,
    **flags: Any,
) -> DiffusionModel:
    """An ADM checkpoint as a :class:`DiffusionModel` (eps prediction, learned variance, ADM schedule) that samples
    as guided-diffusion with DDPM and DDIM (:func:`adm_sampling_conventions`).

    ``preset`` (a key of :data:`ADM_PRESETS`) and ``flags`` (guided-diffusion flag names; they override the
    preset) give the architecture; with neither, guided-diffusion's defaults apply.
    """
    f = adm_flags(preset, **flags)
    torch_dtype = getattr(torch, str(dtype), None)
    if not isinstance(torch_dtype, torch.dtype):
        raise SagConfigError(f"model dtype {dtype!r}; accepted: float32, float16, bfloat16, float64")
    src = str(Path(path).expanduser())
    sd = read_adm_state_dict(src)
    converted = convert_adm_state_dict(sd, preset if preset is not None and not flags else f, source=src)
    net = build_adm_unet(f, device="meta")
    net.load_state_dict({k: v.to(torch_dtype) for k, v in converted.items()}, strict=True, assign=True)
    left = [n for n, t in list(net.named_parameters()) + list(net.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"ADM loader: {left[0]} left on the meta device")
    size = f["image_size"]
    return DiffusionModel(
        name="adm",
        net=net,
        prediction_type="epsilon",
        learned_variance=f["learn_sigma"],
        conditioning="class" if f["class_cond"] else "none",
        num_classes=f["num_classes"] if f["class_cond"] else None,
        has_null_class=False,
        sample_size=(size, size),
        in_channels=f["in_channels"],
        source=str(Path(src).resolve()),
        adm_flags=dict(f),
        **adm_sampling_conventions(f, clip_denoised),
    )


# --- sampling as guided-diffusion --------------------------------------------------------------------------
def adm_sampling_conventions(f: Mapping[str, Any], clip_denoised: bool = True) -> dict[str, Any]:
    """``DiffusionModel`` fields that make DDPM/DDIM sample as guided-diffusion (``gaussian_diffusion.py``,
    ``respace.py``, ``script_util.create_gaussian_diffusion``) for normalised flags ``f``:

    * the schedule in float64 (``GaussianDiffusion.__init__``: np.cumprod of float64 betas), used as is by the
      scheduler (``exact_schedule``) and cast to the sample's dtype last, as ``_extract_into_tensor``;
    * variance: LEARNED_RANGE with learn_sigma, else FIXED_LARGE (``sigma_small`` is False in every official
      script): diffusers' ``learned_range`` / ``fixed_large`` (both the respaced beta_t, as ``SpacedDiffusion``);
    * ``clip_denoised``: x0 clipped to [-1, 1] (``clip_sample``), and DDIM re-derives eps from the clipped x0
      (``ddim_sample``: ``_predict_eps_from_xstart``) = ``step(use_clipped_model_output=True)``;
    * timesteps: ``space_timesteps`` of :func:`adm_timesteps`;
    * classifier guidance as ``classifier_sample.py`` runs it (``cg_form="official"``: ``condition_mean`` after
      ``p_mean_variance``'s clipping for DDPM, ``condition_score`` for DDIM; :mod:`sag.guidance.classifier`).
    """
    betas = adm_betas(f["diffusion_steps"], f["noise_schedule"])
    return {
        "alphas_cumprod": torch.from_numpy(np.cumprod(1.0 - betas, axis=0)),  # float64
        "clip_denoised": clip_denoised,
        "scheduler_config": dict(adm_scheduler_config(f), prediction_type="epsilon", clip_sample=clip_denoised,
                                 variance_type="learned_range" if f["learn_sigma"] else "fixed_large"),
        "step_options": {"use_clipped_model_output": True} if clip_denoised else {},
        "reference_timesteps": adm_timesteps,
        "exact_schedule": True,
        "cg_form": "official",
    }


def adm_timesteps(scheduler: Any, steps: int) -> list[int] | None:
    """guided-diffusion's timesteps for ``steps`` iterations: ``timestep_respacing="ddim<steps>"`` for DDIM and
    ``"<steps>"`` for DDPM (the official README: DDIM ``ddim25``, DDPM ``250``); None (the scheduler's own
    spacing) for other schedulers and for DDIM step counts no integer stride gives (the official code refuses
    them). ``make_scheduler`` gives ADM DDIM as :class:`sag.schedulers.ListedDDIMScheduler`, which runs these
    lists for any N (diffusers' own DDIM steps back by T // N: ``ddimN`` only when N divides T)."""
    num_train = int(scheduler.config.num_train_timesteps)
    if isinstance(scheduler, DDIMScheduler):
        try:
            return space_timesteps(num_train, f"ddim{steps}")
        except ValueError:
            return None
    if isinstance(scheduler, DDPMScheduler):
        return space_timesteps(num_train, str(steps))
    return None


