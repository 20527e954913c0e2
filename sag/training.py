"""Train a class-conditional pixel UNet (diffusers ``UNet2DModel``) on the procedural scenes.

DDPM training (Ho et al. 2020, Algorithm 1): epsilon prediction, uniform t, MSE loss. Classifier-free
guidance needs an unconditional model too: with probability ``label_dropout`` the class is replaced by the
null class ``len(SHAPES)`` (Ho & Salimans 2022 drop labels with p = 0.1 or 0.2).

The optimisation loop, checkpoints and loss log are :mod:`sag.train_loop`'s; this module supplies the
DDPM loss of step ``k`` (scenes from ``(data_seed, k)``, t / noise / label dropout from ``(seed, k)``), the
EMA update (decay a function of ``k``) and the export. A run resumed from a checkpoint (model, EMA,
optimizer, step, loss log) repeats exactly the steps an uninterrupted run would take: on the CPU the
weights are bit-identical.

Settings are a plain nested dict with the keys of ``conf/train.yaml`` (an entry point passes
``OmegaConf.to_container(cfg, resolve=True)``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from sag.data import SHAPES
from sag.domains import EMBEDDED, METADATA_KEY, check_known, scene_maker
from sag.errors import SagConfigError
from sag.io import temp_path
from sag.train_loop import (
    LoopSettings,
    LoopState,
    load_checkpoint,
    pool_indices,
    run_loop,
    save_checkpoint,
    seed_from,
    write_loss_csv,
)

LOSS_SMOOTHING = 0.98  # ema_loss = 0.98 ema_loss + 0.02 loss (display only)
# Fields that must match between a checkpoint and the config that resumes it.
RESUME_KEYS = ("unet", "schedule", "seed", "data_seed", "data.domain", "data.pool_size", "train.batch_size",
               "train.label_dropout")


def build_unet(unet_cfg: Mapping[str, Any]) -> UNet2DModel:
    """The class-conditional UNet; ``num_class_embeds = len(SHAPES) + 1`` (the last is the null class)."""
    kw = dict(unet_cfg)
    for k in ("block_out_channels", "down_block_types", "up_block_types"):
        kw[k] = tuple(kw[k])
    return UNet2DModel(in_channels=3, out_channels=3, num_class_embeds=len(SHAPES) + 1, **kw)


def batch_for_step(data_seed: int, step: int, batch_size: int, pool: dict | None = None, domain: str = EMBEDDED):
    """(images (B,3,32,32), labels (B,)) of step ``step``: a pure function of (data_seed, step).

    Without a pool every step sees fresh scenes ``step*B .. step*B+B-1`` of ``domain``'s generator
    (:func:`sag.domains.scene_maker`); with a pool (tensors, possibly on the training device), B indices drawn by
    :func:`sag.train_loop.pool_indices`.
    """
    if pool is None:
        d = scene_maker(domain)(data_seed, step * batch_size, batch_size)
        return torch.from_numpy(d["image"]), torch.from_numpy(d["label"])
    idx = pool_indices(data_seed, step, len(pool["label"]), batch_size)
    idx = torch.from_numpy(idx).to(pool["label"].device)
    return pool["image"][idx], pool["label"][idx]


def _scene_chunk(args: tuple[str, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    d = scene_maker(args[0])(*args[1:])
    return d["image"], d["label"]


def make_pool(data_seed: int, size: int, workers: int = 1, device: str | torch.device = "cpu",
              domain: str = EMBEDDED) -> dict:
    """Scenes ``0..size-1`` of ``data_seed`` of ``domain`` as tensors on ``device``. Scenes are a pure function of
    (seed, index), so generating them in ``workers`` processes gives the same pool as one process."""
    chunk = max(1, -(-size // max(1, workers)))
    jobs = [(domain, data_seed, s, min(chunk, size - s)) for s in range(0, size, chunk)]
    if workers > 1 and len(jobs) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as ex:
            parts = list(ex.map(_scene_chunk, jobs))
    else:
        parts = [_scene_chunk(j) for j in jobs]
    image = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    label = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return {"image": image.to(device), "label": label.to(device)}


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (or ``cuda:N``) or ``auto`` (cuda when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise SagConfigError(f"device={name!r}; accepted: cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SagConfigError(f"device={name!r} but no CUDA device is visible; accepted here: cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise SagConfigError(f"device={name!r}; accepted: cpu, cuda, cuda:N or auto")
    return device


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """EMA decay after ``step`` updates; warmup min(decay, (1+k)/(10+k)) as diffusers' EMAModel."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def _select(cfg: Mapping[str, Any], dotted: str):
    """``cfg["a"]["b"]`` for ``"a.b"``; None where a key is missing."""
    node: Any = cfg
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, Mapping) else None
    return node


def _check_train_settings(t: Mapping[str, Any]) -> None:
    for name in ("max_steps", "batch_size", "ckpt_every", "warmup_steps"):
        v = t[name]
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise SagConfigError(f"train.{name}={v!r}; accepted: a positive integer")
    if t["max_minutes"] is not None and not float(t["max_minutes"]) > 0:
        raise SagConfigError(f"train.max_minutes={t['max_minutes']!r}; accepted: a positive number or null")
    if not 0 <= float(t["label_dropout"]) < 1:
        raise SagConfigError(f"train.label_dropout={t['label_dropout']!r}; accepted: a number in [0, 1)")


def _precision_autocast(precision: str) -> bool:
    if precision not in ("fp32", "bf16"):
        raise SagConfigError(f"precision={precision!r}; accepted: fp32 or bf16 (autocast; weights stay fp32)")
    return precision == "bf16"


def _initial_unet(cfg: Mapping[str, Any]) -> UNet2DModel:
    """The UNet at its seeded init, or at an earlier export's weights (``init_from``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg["seed"]))
        try:
            model = build_unet(cfg["unet"])
        except (ValueError, TypeError) as e:
            raise SagConfigError(f"unet config cannot build a UNet2DModel: {e}") from None
    init_from = cfg.get("init_from")
    if init_from:  # warm start: model and EMA begin at an earlier export's weights; the optimizer is fresh
        try:
            model.load_state_dict(UNet2DModel.from_pretrained(Path(str(init_from)) / "unet").state_dict())
        except (OSError, ValueError, RuntimeError) as e:
            raise SagConfigError(f"init_from={init_from}: cannot start from its unet/ "
                                 f"({type(e).__name__}: {str(e).splitlines()[0]}); accepted: an export/ dir "
                                 "of a run with the same unet config") from None
    return model


class Trainer:
    """Holds the model, EMA, optimizer and loop state of one run in ``out_dir``; see :func:`train`.

    ``cfg``: plain nested dict with the keys of ``conf/train.yaml``.
    """

    def __init__(self, cfg: Mapping[str, Any], out_dir: str | Path):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.t = t = cfg["train"]
        _check_train_settings(t)
        self.null_class = len(SHAPES)
        self.device = resolve_device(str(cfg.get("device", "cpu")))
        self.autocast = _precision_autocast(str(cfg.get("precision", "fp32")))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
        # the pool first: its worker processes fork before any CUDA context exists
        pool_size = int(cfg["data"]["pool_size"] or 0)
        workers = int(cfg["data"].get("workers", 1) or 1)
        self.domain = check_known(cfg["data"].get("domain", EMBEDDED), "data.domain")
        self.pool = (make_pool(int(cfg["data_seed"]), pool_size, workers, self.device, self.domain)
                     if pool_size > 0 else None)
        self.model = _initial_unet(cfg).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.scheduler_config = dict(cfg["schedule"], prediction_type="epsilon")
        ac = DDPMScheduler.from_config(self.scheduler_config).alphas_cumprod.to(torch.float32)
        self.sqrt_ab, self.sqrt_1m_ab = ac.sqrt().to(self.device), (1 - ac).sqrt().to(self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=float(t["lr"]), betas=tuple(t["betas"]),
                                     weight_decay=float(t["weight_decay"]))
        self.state = LoopState()

    @property
    def step(self) -> int:
        """Optimisation steps done."""
        return self.state.step

    @property
    def ckpt_path(self) -> Path:
        """``<out_dir>/checkpoints/last.pt``."""
        return self.out_dir / "checkpoints" / "last.pt"

    def _signature(self) -> dict:
        return {k: _select(self.cfg, k) for k in RESUME_KEYS}

    def _modules(self) -> dict[str, Any]:
        return {"model": self.model, "ema": self.ema, "optimizer": self.opt}

    # --- one optimisation step -----------------------------------------------------------------------------
    def loss(self, k: int) -> torch.Tensor:
        """DDPM loss of step ``k`` (Ho et al. 2020, Algorithm 1): ||eps - eps_theta(x_t, t, y)||^2."""
        b = int(self.t["batch_size"])
        x0, labels = batch_for_step(int(self.cfg["data_seed"]), k, b, self.pool, self.domain)
        dev = self.device
        x0, labels = x0.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
        # draws on the training device: bit-identical reruns on one device, not across devices
        g = torch.Generator(device=dev).manual_seed(seed_from(int(self.cfg["seed"]), k))
        t = torch.randint(0, len(self.sqrt_ab), (b,), generator=g, device=dev)
        eps = torch.randn(x0.shape, generator=g, device=dev)
        drop = torch.rand(b, generator=g, device=dev) < float(self.t["label_dropout"])
        labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        x_t = self.sqrt_ab[t].view(-1, 1, 1, 1) * x0 + self.sqrt_1m_ab[t].view(-1, 1, 1, 1) * eps
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.autocast):
            pred = self.model(x_t, t, class_labels=labels).sample
        return F.mse_loss(pred.float(), eps)

    def update_ema(self, k: int) -> None:
        """ema <- decay * ema + (1 - decay) * model, with the decay of step ``k`` (:func:`ema_decay_at`)."""
        decay = ema_decay_at(k, float(self.t["ema_decay"]), bool(self.t["ema_warmup"]))
        with torch.no_grad():
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1.0 - decay)

    def loop_settings(self, progress: bool) -> LoopSettings:
        """The loop's view of ``train.*``: warmup then a constant lr (min_lr_ratio 1), checkpoints."""
        t = self.t
        return LoopSettings(max_steps=int(t["max_steps"]), lr=float(t["lr"]), warmup_steps=int(t["warmup_steps"]),
                            max_minutes=t["max_minutes"], grad_clip=t["grad_clip"], smoothing=LOSS_SMOOTHING,
                            ckpt_every=int(t["ckpt_every"]), progress=progress, desc="train")

    # --- checkpoints --------------------------------------------------------------------------------------
    def save_checkpoint(self, _state: LoopState | None = None) -> None:
        """Write ``checkpoints/last.pt`` (atomically), the loss CSV and the export."""
        save_checkpoint(self.ckpt_path, self.state, self._modules(), self._signature())
        self.write_log()
        self.export()

    def load_checkpoint(self) -> bool:
        """Resume from ``checkpoints/last.pt`` if present; False if there is none."""
        return load_checkpoint(self.ckpt_path, self.state, self._modules(), self._signature(), self.device)

    def write_log(self) -> None:
        """``loss.csv``: step, loss, ema_loss, lr, wall_s."""
        write_loss_csv(self.out_dir / "loss.csv", self.state.log)

    def export(self) -> Path:
        """EMA weights as a local diffusers directory ``export/`` (unet/, scheduler/, model_index.json).

        Written into ``export.tmp/`` (files there need no atomic writes: the whole directory is the temp
        copy), then swapped in by directory renames (``export`` -> ``export.old``, ``export.tmp`` ->
        ``export``): ``os.replace`` cannot replace a non-empty directory, so :func:`sag.io.atomic_path` does
        not apply.
        """
        final, old = self.out_dir / "export", self.out_dir / "export.old"
        tmp = temp_path(final)
        shutil.rmtree(tmp, ignore_errors=True)
        copy.deepcopy(self.ema).to("cpu").save_pretrained(tmp / "unet", safe_serialization=True)
        DDPMScheduler.from_config(self.scheduler_config).save_pretrained(tmp / "scheduler")
        import diffusers

        index = {"_class_name": "DDPMPipeline", "_diffusers_version": diffusers.__version__,
                 "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"],
                 METADATA_KEY: self.domain}  # the model declares the domain it was trained on (sag.domains)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        meta = {"classes": list(SHAPES), "null_class": self.null_class, "step": self.step,
                "weights": "ema", "ema_decay": float(self.t["ema_decay"]), "init_from": self.cfg.get("init_from")}
        (tmp / "classes.json").write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        return final


def train(cfg: Mapping[str, Any], out_dir: str | Path, progress: bool | None = None) -> dict:
    """Train (or resume) until ``train.max_steps`` or ``train.max_minutes``, whichever comes first.

    ``cfg``: plain nested dict with the keys of ``conf/train.yaml``. Writes ``checkpoints/last.pt``,
    ``loss.csv`` and ``export/`` (EMA weights) under ``out_dir`` every ``train.ckpt_every`` steps and at
    the end; SIGTERM / Ctrl-C also stop cleanly with a checkpoint. Returns a summary dict.
    """
    torch.set_num_threads(int(cfg["threads"]))
    trainer = Trainer(cfg, out_dir)
    trainer.out_dir.mkdir(parents=True, exist_ok=True)
    resumed = bool(cfg["resume"]) and trainer.load_checkpoint()
    show = bool(cfg["progress"]) if progress is None else progress
    start_step = trainer.step
    reason = run_loop(trainer.model, trainer.opt, trainer.loss, trainer.state, trainer.loop_settings(show),
                      after_update=trainer.update_ema, checkpoint=trainer.save_checkpoint)
    if trainer.step != start_step or not trainer.ckpt_path.is_file() or resumed:
        trainer.save_checkpoint()
    state = trainer.state
    return {"out_dir": str(trainer.out_dir), "step": state.step, "steps_this_run": state.step - start_step,
            "resumed": resumed, "stopped_by": reason, "ema_loss": state.ema_loss,
            "export": str(trainer.out_dir / "export"), "wall_s": state.wall_s}
