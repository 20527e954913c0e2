"""Load a local diffusers directory (``save_pretrained`` layout); nothing is downloaded.

Supported layouts:

* a DDPM/DDIM pipeline (``model_index.json``, ``unet/`` with a UNet2DModel, ``scheduler/``); class-conditional
  UNets name their classes and null class in ``classes.json``;
* a Stable Diffusion 1.x/2.x pipeline (``unet/`` UNet2DConditionModel, ``vae/``, ``text_encoder/`` CLIPTextModel,
  ``tokenizer/`` CLIPTokenizer, ``scheduler/``): prompts are embedded as ``StableDiffusionPipeline.encode_prompt``
  does (``model.encode_prompt``), the unconditional input is the empty (or ``negative_prompt``) embedding;
* Stable Diffusion XL / 3 and Flux pipelines (``StableDiffusionXLPipeline``; ``StableDiffusion3Pipeline`` and
  ``FluxPipeline``, flow matching): :mod:`sag.models.sdxl`, :mod:`.sd3`, :mod:`.flux` register those families;
* a DiT pipeline (``transformer/`` DiTTransformer2DModel, or the legacy Transformer2DModel with
  ``norm_type="ada_norm_zero"``, ``vae/``, ``scheduler/``): class-conditional with learned sigma; label
  ``num_embeds_ada_norm`` (1000 for ImageNet) is the null class used for classifier-free guidance;
* a bare model folder (``config.json`` + weights) of one of the classes above.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any

import diffusers
import torch
from safetensors import safe_open
from torch import Tensor, nn

from sag.domains import declared_domain
from sag.errors import SagConfigError
from sag.models.base import DiffusionModel

LAYOUT = (
    "a local diffusers directory: a pipeline (model_index.json: DDPMPipeline/DDIMPipeline with unet/, "
    "StableDiffusionPipeline with unet/ vae/ text_encoder/ tokenizer/, StableDiffusionXLPipeline with also "
    "text_encoder_2/ tokenizer_2/, StableDiffusion3Pipeline (+ _3 parts), FluxPipeline (CLIP + T5), DiTPipeline "
    "with transformer/ vae/; plus scheduler/) or a bare UNet2DModel/UNet2DConditionModel/DiTTransformer2DModel "
    "folder (config.json + weights)"
)
# config.json ``_class_name`` of the denoiser -> its family (see :func:`_family`)
FAMILIES = {
    "UNet2DModel": "unet",  # DDPM/DDIM pipelines, the embedded model: unconditional or class labels
    "UNet2DConditionModel": "text",  # Stable Diffusion 1.x/2.x: CLIP text embeddings
    "DiTTransformer2DModel": "dit",  # DiT: class labels, learned sigma
    "Transformer2DModel": "dit",  # legacy DiT class, only with norm_type ada_norm_zero
    "SD3Transformer2DModel": "sd3",  # SD3: flow matching, joint attention (fields: sag.models.sd3, registered)
    "FluxTransformer2DModel": "flux",  # Flux: flow matching, packed latents (fields: sag.models.flux, registered)
}
NET_CLASSES = tuple(FAMILIES)
FLOW_FAMILIES = {"sd3": "an SD3", "flux": "a Flux"}  # families on the flow schedule (velocity prediction, no betas)
# model_index.json ``_class_name`` -> the denoiser component
PIPELINES = {**dict.fromkeys(("DDPMPipeline", "DDIMPipeline", "StableDiffusionPipeline", "StableDiffusionSAGPipeline",
                              "StableDiffusionXLPipeline"), "unet"),
             **dict.fromkeys(("DiTPipeline", "StableDiffusion3Pipeline", "FluxPipeline"), "transformer")}
HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None  # else diffusers warns on every load
TEXT_ENCODERS = ("CLIPTextModel",)
TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
COMPONENTS = ("vae", *(p + s for s in ("", "_2", "_3") for p in ("text_encoder", "tokenizer")))  # parts read
# The training-schedule entries of a scheduler config: they define the model's alphas_cumprod. Every other entry
# (timestep_spacing, steps_offset, clip_sample, variance_type, set_alpha_to_one, ...) is a sampler setting, carried
# with them into ``scheduler_config`` so that ``make_scheduler`` builds what diffusers' ``from_config`` builds from the
# folder's own scheduler: the pipeline's sampler, and the folder's conventions for any other kind.
# ``rescale_betas_zero_snr`` is left to the schedulers: the model's alphas_cumprod keeps the plain betas (a zero
# terminal SNR has no finite sigma for sag.schedule), as before.
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SagConfigError(f"{path}: cannot read JSON ({e}); expected {LAYOUT}") from None


def _component(index: dict, key: str) -> str | None:
    """The class a model_index.json entry names (``["diffusers", "UNet2DModel"]``), None when absent/null."""
    entry = index.get(key)
    if isinstance(entry, list | tuple) and len(entry) == 2 and entry[1] is not None:
        return str(entry[1])
    return None


def _subdir(root: Path, index_file: Path, key: str, cls: str) -> Path:
    d = root / key
    if not d.is_dir():
        raise SagConfigError(f"{index_file} names {key} {cls!r} but the folder {d} is missing; copy the pipeline's "
                             f"{key}/ folder there")
    if not key.startswith("tokenizer") and not (d / "config.json").is_file():
        raise SagConfigError(f"{d} has no config.json; expected the save_pretrained folder of a {cls}")
    return d


def _locate(path: Path) -> dict:
    """The folders of the parts: net, scheduler, vae, text_encoder, tokenizer (None when absent)."""
    if not path.exists():
        raise SagConfigError(f"model.path {str(path)!r} does not exist; expected {LAYOUT}")
    if not path.is_dir():
        raise SagConfigError(f"model.path {str(path)!r} is a file, not a directory; expected {LAYOUT}")
    sched = path / "scheduler" if (path / "scheduler").is_dir() else None
    parts = {"net": path, "scheduler": sched, "index": {}, **dict.fromkeys(COMPONENTS)}
    index_file = path / "model_index.json"
    if index_file.is_file():
        index = _read_json(index_file)
        pipeline = index.get("_class_name")
        if pipeline is not None and pipeline not in PIPELINES:
            raise SagConfigError(f"{index_file}: pipeline {pipeline!r} is not supported; accepted: "
                                 f"{sorted(PIPELINES)} (or point model.path at a bare unet/ folder)")
        key = PIPELINES.get(pipeline) or next((k for k in ("unet", "transformer") if _component(index, k)), None)
        if key is None or _component(index, key) is None:
            raise SagConfigError(f"{index_file} names no {key or 'unet or transformer'!r} component; "
                                 f"expected {LAYOUT}")
        parts.update(net=_subdir(path, index_file, key, _component(index, key)), index=index)
        for part in COMPONENTS:
            cls = _component(index, part)
            if cls is not None:
                parts[part] = _subdir(path, index_file, part, cls)
        return parts
    if (path / "config.json").is_file():
        return parts
    raise SagConfigError(f"model.path {str(path)!r} has neither model_index.json nor config.json; expected {LAYOUT}")


def _load_error(folder: Path, cls_name: str, e: Exception) -> SagConfigError:
    """One line from a loading error; a shape mismatch names config.json and the offending parameter."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    mismatch = next((ln for ln in lines if "size mismatch" in ln or "shape" in ln and "checkpoint" in ln), None)
    if mismatch is not None:
        return SagConfigError(f"{folder / 'config.json'} does not match the weights in {folder}: {mismatch}")
    for weights in sorted(folder.glob("*.safetensors")):  # diffusers only says "Unable to load weights": name why
        try:
            safe_open(str(weights), framework="pt").keys()
        except Exception as bad:  # safetensors raises SafetensorError (header) or OSError
            return SagConfigError(f"{weights}: not a readable safetensors file ({_one_line(bad)}); accepted: a "
                                  "complete weights file (copy or export it again)")
    first = lines[0] if lines else type(e).__name__
    return SagConfigError(f"{folder}: cannot load {cls_name} weights: {first}")


def _one_line(e: Exception) -> str:
    return "; ".join(ln.strip() for ln in str(e).splitlines() if ln.strip()) or type(e).__name__


def _check_loading_info(folder: Path, cls_name: str, info: dict) -> None:
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise SagConfigError(f"{folder / 'config.json'} does not match the weights in {folder}: {len(missing)} "
                             f"parameter(s) of the {cls_name} are missing from the weights (e.g. {missing[0]}), "
                             "they would be random")
    mismatched = list(info.get("mismatched_keys") or [])
    if mismatched:
        raise SagConfigError(f"{folder / 'config.json'} does not match the weights in {folder}: shape mismatch "
                             f"for {mismatched[0]}")


def _load_diffusers_model(cls_name: str, folder: Path, torch_dtype: torch.dtype):
    cls = getattr(diffusers, cls_name)
    try:
        model, info = cls.from_pretrained(folder, torch_dtype=torch_dtype, local_files_only=True,
                                          output_loading_info=True, low_cpu_mem_usage=HAS_ACCELERATE)
    except SagConfigError:
        raise
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
        raise _load_error(folder, cls_name, e) from None
    _check_loading_info(folder, cls_name, info)
    return model


class PromptEncoder:
    """Prompts -> CLIP text embeddings (B, L, D), exactly as diffusers' ``StableDiffusionPipeline.encode_prompt``
    (clip_skip=None): padded to the tokenizer's max length, truncated with a warning, attention mask only when the
    text encoder's config asks for one. Runs on the text encoder's device; ``to`` moves it with the model."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder.eval().requires_grad_(False)
        max_len = int(getattr(tokenizer, "model_max_length", 0) or 0)
        if not 0 < max_len <= 100_000:  # tokenizers without a configured length report ~1e30
            max_len = int(text_encoder.config.max_position_embeddings)
        self.max_length = max_len

    def to(self, device=None, dtype=None) -> PromptEncoder:
        """Move the text encoder in place; returns ``self``."""
        self.text_encoder.to(**{k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})
        return self

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> Tensor:
        prompts = [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
        enc = self.text_encoder
        device = next(enc.parameters()).device
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        longest = self.tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
        if longest.shape[-1] > tok.input_ids.shape[-1]:
            removed = self.tokenizer.batch_decode(longest[:, self.max_length - 1 : -1])
            warnings.warn(f"prompt truncated to {self.max_length} tokens (CLIP's limit); removed: {removed}",
                          stacklevel=2)
        mask = tok.attention_mask.to(device) if getattr(enc.config, "use_attention_mask", False) else None
        out = enc(tok.input_ids.to(device), attention_mask=mask)[0]
        return out.to(dtype=enc.dtype)


def _load_text(root: Path, parts: dict, torch_dtype: torch.dtype) -> PromptEncoder:
    index_file = root / "model_index.json"
    if parts["text_encoder"] is None or parts["tokenizer"] is None:
        missing = [p for p in ("text_encoder", "tokenizer") if parts[p] is None]
        raise SagConfigError(f"{index_file}: a Stable Diffusion pipeline (UNet2DConditionModel) needs text_encoder/ "
                             f"and tokenizer/; it names no {' and no '.join(missing)}")
    enc_cls, tok_cls = _component(parts["index"], "text_encoder"), _component(parts["index"], "tokenizer")
    if enc_cls not in TEXT_ENCODERS:
        raise SagConfigError(f"{index_file}: text_encoder {enc_cls!r} is not supported; accepted: {list(TEXT_ENCODERS)}"
                             " (Stable Diffusion 1.x/2.x)")
    if tok_cls not in TOKENIZERS:
        raise SagConfigError(f"{index_file}: tokenizer {tok_cls!r} is not supported; accepted: {list(TOKENIZERS)}")
    try:
        import transformers
    except ImportError:
        raise SagConfigError(f"{root}: Stable Diffusion pipelines need transformers for the text encoder; install the "
                             "sd extra: pip install 'sag-lab[sd]'") from None
    folder = parts["text_encoder"]
    try:
        tokenizer = transformers.CLIPTokenizer.from_pretrained(parts["tokenizer"], local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise _load_error(parts["tokenizer"], "CLIPTokenizer", e) from None
    try:
        enc, info = transformers.CLIPTextModel.from_pretrained(folder, local_files_only=True, dtype=torch_dtype,
                                                               output_loading_info=True)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
        raise _load_error(folder, "CLIPTextModel", e) from None
    _check_loading_info(folder, "CLIPTextModel", info)
    return PromptEncoder(tokenizer, enc)


# --- families: what a denoiser class brings besides the net --------------------------------------------------
def _family(net_dir: Path, cfg: dict) -> tuple[str, str]:
    """(family, diffusers class to load) of the denoiser folder: the one place a folder's family is decided."""
    cls_name = cfg.get("_class_name")
    if cls_name not in FAMILIES:
        raise SagConfigError(f"{net_dir / 'config.json'}: _class_name {cls_name!r} is not one of {NET_CLASSES}")
    if cls_name == "Transformer2DModel":
        if cfg.get("norm_type") != "ada_norm_zero" or not cfg.get("patch_size"):
            raise SagConfigError(f"{net_dir / 'config.json'}: a Transformer2DModel is supported only as DiT "
                                 f"(norm_type 'ada_norm_zero' with patch_size), not norm_type "
                                 f"{cfg.get('norm_type')!r}")
        cls_name = "DiTTransformer2DModel"  # what diffusers itself remaps it to
    added = cfg.get("addition_embed_type")
    if cls_name == "UNet2DConditionModel" and added is not None:
        if added != "text_time":
            raise SagConfigError(f"{net_dir / 'config.json'}: addition_embed_type {added!r} is not supported; "
                                 "accepted: null (Stable Diffusion 1.x/2.x) or 'text_time' (SDXL)")
        return "sdxl", cls_name  # fields: sag.models.sdxl (registered)
    return FAMILIES[cls_name], cls_name


def _unet_fields(root: Path, parts: dict, cfg: dict, net: nn.Module, torch_dtype: torch.dtype,
                 negative_prompt: str | None) -> dict[str, Any]:
    """UNet2DModel (DDPM/DDIM pipelines, trained pixel UNets): unconditional, or class labels.

    ``classes.json`` (written by experiments.train) names the classes and the null class, which is the last
    embedding, used for classifier-free guidance; without it every embedding is a class.
    """
    if not cfg.get("num_class_embeds"):
        return {"conditioning": "none"}
    fields: dict[str, Any] = {"conditioning": "class", "num_classes": int(cfg["num_class_embeds"])}
    classes_file = root / "classes.json"
    if classes_file.is_file():
        info = _read_json(classes_file)
        fields["class_names"] = list(info.get("classes", [])) or None
        null = info.get("null_class")
        if null is not None:
            if int(null) != fields["num_classes"] - 1:
                raise SagConfigError(f"{classes_file}: null_class {null} is not the last of "
                                     f"{fields['num_classes']} class embeddings")
            fields.update(num_classes=fields["num_classes"] - 1, has_null_class=True)
    return fields


def _text_fields(root: Path, parts: dict, cfg: dict, net: nn.Module, torch_dtype: torch.dtype,
                 negative_prompt: str | None) -> dict[str, Any]:
    """UNet2DConditionModel (Stable Diffusion): prompts through the pipeline's CLIP text encoder (a bare UNet
    folder has none: pass embeddings as cond)."""
    if not parts["index"]:
        return {"conditioning": "text"}
    encode_prompt = _load_text(root, parts, torch_dtype)
    null_text = encode_prompt([negative_prompt or ""])  # (1, L, D), as encode_prompt's negative branch
    return {"conditioning": "text", "encode_prompt": encode_prompt, "null_text": null_text}


def _dit_fields(root: Path, parts: dict, cfg: dict, net: nn.Module, torch_dtype: torch.dtype,
                negative_prompt: str | None) -> dict[str, Any]:
    """DiT: called as ``net(x, timestep=t, class_labels=y)``; latent x0 is never clipped."""
    fields: dict[str, Any] = {"conditioning": "none", "call_style": "transformer", "clip_denoised": False}
    if not cfg.get("num_embeds_ada_norm"):
        return fields
    # DiT's label embedding has one extra row (the CFG null class, label num_classes) when it was trained
    # with class dropout, as every DiT: DiTPipeline passes label 1000 for the unconditional branch.
    num_classes = int(cfg["num_embeds_ada_norm"])
    rows = [m.embedding_table.num_embeddings for m in net.modules() if hasattr(m, "embedding_table")]
    fields.update(conditioning="class", num_classes=num_classes, has_null_class=bool(rows) and rows[0] > num_classes)
    id2label = parts["index"].get("id2label")
    if isinstance(id2label, dict):
        fields["class_names"] = [str(id2label.get(str(i), i)) for i in range(num_classes)]
    return fields


_FAMILY_FIELDS = {"unet": _unet_fields, "text": _text_fields, "dit": _dit_fields}  # + registered families


def register_family(family: str, fields) -> None:  # a module using these helpers registers itself (sag.models.sdxl)
    """Add the fields builder (signature of :func:`_text_fields`) of a family that :func:`_family` names."""
    _FAMILY_FIELDS[family] = fields


# --- the shared parts ---------------------------------------------------------------------------------------
def _torch_dtype(dtype: str) -> torch.dtype:
    torch_dtype = getattr(torch, str(dtype), None)
    if not isinstance(torch_dtype, torch.dtype):
        raise SagConfigError(f"dtype={dtype!r}; accepted: float32, float16, bfloat16")
    return torch_dtype


def _scheduler_config(sched_dir: Path | None) -> dict[str, Any]:
    """The folder's scheduler config as written (its public entries and ``_class_name``); {} when absent, so that
    every scheduler kind keeps its own defaults (diffusers' DDPM training schedule: linear 1e-4..0.02, 1000 steps)."""
    if sched_dir is None:
        return {}
    cfg = _read_json(sched_dir / "scheduler_config.json")
    return {k: v for k, v in cfg.items() if not k.startswith("_") or k == "_class_name"}


def _alphas_cumprod(sched_cfg: dict[str, Any]) -> Tensor:
    """alphas_cumprod of the training schedule (diffusers' DDPM defaults for missing entries)."""
    schedule = {k: sched_cfg[k] for k in SCHEDULE_KEYS if k in sched_cfg}
    return diffusers.DDPMScheduler.from_config(schedule).alphas_cumprod.clone()


def _load_vae(root: Path, parts: dict, torch_dtype: torch.dtype) -> tuple[nn.Module | None, float]:
    """(the pipeline's AutoencoderKL or None, its latent scaling factor)."""
    if parts["vae"] is None:
        return None, 1.0
    vae_cls = _component(parts["index"], "vae")
    if vae_cls != "AutoencoderKL":
        raise SagConfigError(f"{root / 'model_index.json'}: vae {vae_cls!r} is not supported; accepted: "
                             "['AutoencoderKL']")
    vae = _load_diffusers_model("AutoencoderKL", parts["vae"], torch_dtype)
    return vae, float(vae.config.get("scaling_factor", 0.18215))  # SD 1.x's factor when the config has none


def load_diffusers_dir(
    path: str,
    prediction_type: str | None = None,
    clip_denoised: bool | None = None,
    dtype: str = "float32",
    negative_prompt: str | None = None,
    flux_guidance: float | None = None,
) -> DiffusionModel:
    """Denoiser + training schedule (+ VAE, + text encoder) from a local directory.

    The training schedule (betas) and the prediction type come from ``scheduler/scheduler_config.json`` when
    present, else diffusers' DDPM defaults (linear 1e-4..0.02, 1000 steps, epsilon). The whole scheduler config goes
    into ``scheduler_config``, so ``make_scheduler`` reproduces the pipeline's own sampler (DDPM/DDIM pipelines:
    timestep_spacing, steps_offset, clip_sample, variance_type, ...) and options passed to it still win. Pixel x0
    estimates are clipped (``clip_denoised``) when the folder's scheduler clips them (``clip_sample``, default on).
    For text models, ``negative_prompt`` replaces the empty prompt as the unconditional input (diffusers'
    ``negative_prompt``). ``flux_guidance``: FLUX.1-dev's distilled guidance input (:mod:`sag.models.flux`).
    """
    root = Path(path).expanduser()
    parts = _locate(root)
    cfg = _read_json(parts["net"] / "config.json")
    family, cls_name = _family(parts["net"], cfg)
    if negative_prompt is not None and family not in ("text", "sdxl", "sd3", "flux"):
        raise SagConfigError(f"negative_prompt={negative_prompt!r} but {root} holds a {cls_name}, not a text model")
    if prediction_type is not None and family in FLOW_FAMILIES:  # a flow model's prediction is its velocity, always
        raise SagConfigError(f"prediction_type={prediction_type!r}: {root} holds {FLOW_FAMILIES[family]} flow model; "
                             "accepted: null")
    if flux_guidance is not None and family != "flux":
        raise SagConfigError(f"flux_guidance={flux_guidance!r} but {root} holds a {cls_name}, not a Flux transformer")
    torch_dtype = _torch_dtype(dtype)
    net = _load_diffusers_model(cls_name, parts["net"], torch_dtype)
    sched_cfg = _scheduler_config(parts["scheduler"])
    vae, latent_scale = _load_vae(root, parts, torch_dtype)
    clip_x0 = vae is None and bool(sched_cfg.get("clip_sample", True))  # latents are never clipped
    extra = {"flux_guidance": flux_guidance} if family == "flux" else {}
    fields = {"clip_denoised": clip_x0, **_FAMILY_FIELDS[family](root, parts, cfg, net, torch_dtype, negative_prompt,
                                                                 **extra)}
    pred = prediction_type or sched_cfg.get("prediction_type", "epsilon")
    in_ch = int(cfg.get("in_channels", 3))
    out_ch = int(cfg.get("out_channels") or in_ch)
    size = cfg.get("sample_size", 32)
    return DiffusionModel(**{**dict(  # a family's fields win (sd3, flux: flow schedule, prediction type, net, ...)
        name=root.name, net=net,
        alphas_cumprod=_alphas_cumprod(sched_cfg) if family not in FLOW_FAMILIES else None,
        prediction_type=pred, decoder=vae, latent_scale=latent_scale, in_channels=in_ch,
        learned_variance=out_ch == 2 * in_ch or sched_cfg.get("variance_type") in ("learned", "learned_range"),
        sample_size=tuple(size) if isinstance(size, list | tuple) else (int(size), int(size)),
        scheduler_config=dict(sched_cfg, prediction_type=pred),
        source=str(root.resolve()), domain=declared_domain(str(root), parts["index"], cfg),  # sag.domains
    ), **fields, **({} if clip_denoised is None else {"clip_denoised": clip_denoised})})  # the user's clip wins
