"""Load a local diffusers directory (``save_pretrained`` layout); nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch

from sag.errors import SagConfigError
from sag.models.base import DiffusionModel

LAYOUT = (
    "a local diffusers directory: a pipeline (model_index.json with unet/ and scheduler/, e.g. DDPMPipeline) "
    "or a UNet2DModel/UNet2DConditionModel folder (config.json + weights)"
)
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SagConfigError(f"{path}: cannot read JSON ({e}); expected {LAYOUT}") from None


def _locate(path: Path) -> tuple[Path, Path | None, Path | None]:
    """(unet dir, scheduler dir or None, vae dir or None)."""
    if not path.exists():
        raise SagConfigError(f"model.path {str(path)!r} does not exist; expected {LAYOUT}")
    if not path.is_dir():
        raise SagConfigError(f"model.path {str(path)!r} is a file, not a directory; expected {LAYOUT}")
    if (path / "model_index.json").is_file():
        index = _read_json(path / "model_index.json")
        if "unet" not in index:
            raise SagConfigError(f"{path / 'model_index.json'} names no 'unet' component; expected {LAYOUT}")
        vae = path / "vae" if "vae" in index and (path / "vae").is_dir() else None
        sched = path / "scheduler" if (path / "scheduler").is_dir() else None
        return path / "unet", sched, vae
    if (path / "config.json").is_file():
        sched = path / "scheduler" if (path / "scheduler").is_dir() else None
        return path, sched, None
    raise SagConfigError(f"model.path {str(path)!r} has neither model_index.json nor config.json; expected {LAYOUT}")


def load_diffusers_dir(
    path: str,
    prediction_type: str | None = None,
    clip_denoised: bool | None = None,
    dtype: str = "float32",
) -> DiffusionModel:
    """UNet + training schedule (+ VAE) from a local directory.

    The training schedule (betas) comes from ``scheduler/scheduler_config.json`` when present, else
    diffusers' DDPM defaults (linear 1e-4..0.02, 1000 steps).
    """
    root = Path(path).expanduser()
    unet_dir, sched_dir, vae_dir = _locate(root)
    cfg = _read_json(unet_dir / "config.json")
    cls_name = cfg.get("_class_name")
    if cls_name not in UNET_CLASSES:
        raise SagConfigError(f"{unet_dir / 'config.json'}: _class_name {cls_name!r} is not one of {UNET_CLASSES}")
    torch_dtype = getattr(torch, dtype)
    try:
        net = getattr(diffusers, cls_name).from_pretrained(unet_dir, torch_dtype=torch_dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise SagConfigError(f"{unet_dir}: cannot load {cls_name} weights: {str(e).splitlines()[0]}") from None

    sched_cfg = _read_json(sched_dir / "scheduler_config.json") if sched_dir else {}
    schedule_keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    base = {k: sched_cfg[k] for k in schedule_keys if k in sched_cfg}
    alphas_cumprod = diffusers.DDPMScheduler.from_config(base).alphas_cumprod.clone()
    pred = prediction_type or sched_cfg.get("prediction_type", "epsilon")
    in_ch = int(cfg.get("in_channels", 3))
    out_ch = int(cfg.get("out_channels", in_ch))
    learned = out_ch == 2 * in_ch or sched_cfg.get("variance_type") in ("learned", "learned_range")

    vae = None
    latent_scale = 1.0
    if vae_dir is not None:
        vae = diffusers.AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch_dtype)
        latent_scale = float(vae.config.get("scaling_factor", 0.18215))
    size = cfg.get("sample_size", 32)
    size = tuple(size) if isinstance(size, list | tuple) else (int(size), int(size))
    conditioning = "text" if cls_name == "UNet2DConditionModel" else "none"
    num_classes, has_null, class_names = None, False, None
    if cls_name == "UNet2DModel" and cfg.get("num_class_embeds"):
        conditioning, num_classes = "class", int(cfg["num_class_embeds"])
        # classes.json (written by experiments.train) names the classes and the null class, which is
        # the last embedding, used for classifier-free guidance; without it every embedding is a class.
        classes_file = root / "classes.json"
        if classes_file.is_file():
            info = _read_json(classes_file)
            class_names = list(info.get("classes", [])) or None
            null = info.get("null_class")
            if null is not None:
                if int(null) != num_classes - 1:
                    raise SagConfigError(f"{classes_file}: null_class {null} is not the last of "
                                         f"{num_classes} class embeddings")
                num_classes, has_null = num_classes - 1, True
    return DiffusionModel(
        name=root.name,
        net=net,
        alphas_cumprod=alphas_cumprod,
        prediction_type=pred,
        learned_variance=learned,
        conditioning=conditioning,
        num_classes=num_classes,
        has_null_class=has_null,
        class_names=class_names,
        decoder=vae,
        latent_scale=latent_scale,
        sample_size=size,
        in_channels=in_ch,
        clip_denoised=(vae is None) if clip_denoised is None else clip_denoised,
        scheduler_config=dict(base, prediction_type=pred),
        source=str(root.resolve()),
    )
