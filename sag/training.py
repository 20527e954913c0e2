"""Train a class-conditional pixel UNet (diffusers ``UNet2DModel``) on the procedural scenes.

DDPM training (Ho et al. 2020, Algorithm 1): epsilon prediction, uniform t, MSE loss. Classifier-free
guidance needs an unconditional model too: with probability ``label_dropout`` the class is replaced by the
null class ``len(SHAPES)`` (Ho & Salimans 2022 drop labels with p = 0.1 or 0.2).

Determinism: every random draw of step ``k`` (the scenes, t, noise, label dropout) comes from generators
seeded by ``(seed, k)`` / ``(data_seed, k)``, and the learning rate and EMA decay are functions of ``k``.
So a run resumed from a checkpoint (model, EMA, optimizer, step, loss log) repeats exactly the steps an
uninterrupted run would take: on the CPU the weights are bit-identical.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from sag.data import SHAPES, make_scenes
from sag.errors import SagConfigError

LOG_COLUMNS = ("step", "loss", "ema_loss", "lr", "wall_s")
LOSS_SMOOTHING = 0.98  # ema_loss = 0.98 ema_loss + 0.02 loss (display only)
# Fields that must match between a checkpoint and the config that resumes it.
RESUME_KEYS = ("unet", "schedule", "seed", "data_seed", "data.pool_size", "train.batch_size", "train.label_dropout")


def build_unet(unet_cfg: Mapping[str, Any]) -> UNet2DModel:
    """The class-conditional UNet; ``num_class_embeds = len(SHAPES) + 1`` (the last is the null class)."""
    kw = dict(unet_cfg)
    for k in ("block_out_channels", "down_block_types", "up_block_types"):
        kw[k] = tuple(kw[k])
    return UNet2DModel(in_channels=3, out_channels=3, num_class_embeds=len(SHAPES) + 1, **kw)


def _seed_from(*words: int) -> int:
    """A 63-bit seed from a tuple of integers (numpy SeedSequence hashing)."""
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def batch_for_step(data_seed: int, step: int, batch_size: int, pool: dict | None = None):
    """(images (B,3,32,32), labels (B,)) of step ``step``: a pure function of (data_seed, step).

    Without a pool every step sees fresh scenes ``step*B .. step*B+B-1``; with a pool (tensors, possibly
    on the training device), B indices drawn from ``default_rng([data_seed, step, 1])``.
    """
    if pool is None:
        d = make_scenes(data_seed, step * batch_size, batch_size)
        return torch.from_numpy(d["image"]), torch.from_numpy(d["label"])
    idx = np.random.default_rng([data_seed, step, 1]).integers(0, len(pool["label"]), batch_size)
    idx = torch.from_numpy(idx).to(pool["label"].device)
    return pool["image"][idx], pool["label"][idx]


def _scene_chunk(args: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    d = make_scenes(*args)
    return d["image"], d["label"]


def make_pool(data_seed: int, size: int, workers: int = 1, device: str | torch.device = "cpu") -> dict:
    """Scenes ``0..size-1`` of ``data_seed`` as tensors on ``device``. Scenes are a pure function of
    (seed, index), so generating them in ``workers`` processes gives the same pool as one process."""
    chunk = max(1, -(-size // max(1, workers)))
    jobs = [(data_seed, s, min(chunk, size - s)) for s in range(0, size, chunk)]
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


def lr_at(step: int, lr: float, warmup_steps: int) -> float:
    """Linear warmup to ``lr`` then constant (DDPM used 5000 warmup steps then a constant 2e-4)."""
    return lr * min(1.0, (step + 1) / max(1, warmup_steps))


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """EMA decay after ``step`` updates; warmup min(decay, (1+k)/(10+k)) as diffusers' EMAModel."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def _cfg_get(cfg: DictConfig, dotted: str):
    return OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(cfg, dotted)}), resolve=True)["v"]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Trainer:
    """Holds the model, EMA, optimizer and loss log of one run in ``out_dir``; see :func:`train`."""

    def __init__(self, cfg: DictConfig, out_dir: str | Path):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        t = cfg.train
        for name in ("max_steps", "batch_size", "ckpt_every", "warmup_steps"):
            v = t[name]
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise SagConfigError(f"train.{name}={v!r}; accepted: a positive integer")
        if t.max_minutes is not None and not float(t.max_minutes) > 0:
            raise SagConfigError(f"train.max_minutes={t.max_minutes!r}; accepted: a positive number or null")
        if not 0 <= float(t.label_dropout) < 1:
            raise SagConfigError(f"train.label_dropout={t.label_dropout!r}; accepted: a number in [0, 1)")
        self.null_class = len(SHAPES)
        self.device = resolve_device(str(cfg.get("device", "cpu")))
        precision = str(cfg.get("precision", "fp32"))
        if precision not in ("fp32", "bf16"):
            raise SagConfigError(f"precision={precision!r}; accepted: fp32 or bf16 (autocast; weights stay fp32)")
        self.autocast = precision == "bf16"
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
        # the pool first: its worker processes fork before any CUDA context exists
        pool_size = int(cfg.data.pool_size or 0)
        workers = int(cfg.data.get("workers", 1) or 1)
        self.pool = make_pool(int(cfg.data_seed), pool_size, workers, self.device) if pool_size > 0 else None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg.seed))
            try:
                self.model = build_unet(OmegaConf.to_container(cfg.unet, resolve=True))
            except (ValueError, TypeError) as e:
                raise SagConfigError(f"unet config cannot build a UNet2DModel: {e}") from None
        init_from = cfg.get("init_from")
        if init_from:  # warm start: model and EMA begin at an earlier export's weights; the optimizer is fresh
            try:
                state = UNet2DModel.from_pretrained(Path(str(init_from)) / "unet").state_dict()
                self.model.load_state_dict(state)
            except (OSError, ValueError, RuntimeError) as e:
                raise SagConfigError(f"init_from={init_from}: cannot start from its unet/ "
                                     f"({type(e).__name__}: {str(e).splitlines()[0]}); accepted: an export/ dir "
                                     "of a run with the same unet config") from None
        self.model.to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        schedule = OmegaConf.to_container(cfg.schedule, resolve=True)
        self.scheduler_config = dict(schedule, prediction_type="epsilon")
        ac = DDPMScheduler.from_config(self.scheduler_config).alphas_cumprod.to(torch.float32)
        self.sqrt_ab, self.sqrt_1m_ab = ac.sqrt().to(self.device), (1 - ac).sqrt().to(self.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=float(t.lr), betas=tuple(t.betas),
                                     weight_decay=float(t.weight_decay))
        self.step = 0
        self.wall_s = 0.0
        self.ema_loss: float | None = None
        self.log: list[list[float]] = []

    # --- paths ------------------------------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / "checkpoints" / "last.pt"

    def _signature(self) -> dict:
        return {k: _cfg_get(self.cfg, k) for k in RESUME_KEYS}

    # --- one optimisation step -----------------------------------------------------------------------------
    def train_step(self) -> float:
        t_cfg = self.cfg.train
        k, b = self.step, int(t_cfg.batch_size)
        x0, labels = batch_for_step(int(self.cfg.data_seed), k, b, self.pool)
        dev = self.device
        x0, labels = x0.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
        # draws on the training device: bit-identical reruns on one device, not across devices
        g = torch.Generator(device=dev).manual_seed(_seed_from(int(self.cfg.seed), k))
        t = torch.randint(0, len(self.sqrt_ab), (b,), generator=g, device=dev)
        eps = torch.randn(x0.shape, generator=g, device=dev)
        drop = torch.rand(b, generator=g, device=dev) < float(t_cfg.label_dropout)
        labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        x_t = self.sqrt_ab[t].view(-1, 1, 1, 1) * x0 + self.sqrt_1m_ab[t].view(-1, 1, 1, 1) * eps

        lr = lr_at(k, float(t_cfg.lr), int(t_cfg.warmup_steps))
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.model.train()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.autocast):
            pred = self.model(x_t, t, class_labels=labels).sample
        loss = F.mse_loss(pred.float(), eps)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if t_cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(t_cfg.grad_clip))
        self.opt.step()
        decay = ema_decay_at(k, float(t_cfg.ema_decay), bool(t_cfg.ema_warmup))
        with torch.no_grad():
            ema_p, p = list(self.ema.parameters()), list(self.model.parameters())
            torch._foreach_lerp_(ema_p, p, 1.0 - decay)
        self.step += 1
        value = float(loss.detach())
        self.ema_loss = value if self.ema_loss is None else (
            LOSS_SMOOTHING * self.ema_loss + (1 - LOSS_SMOOTHING) * value)
        self._last_lr = lr
        return value

    # --- checkpoints --------------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Write ``checkpoints/last.pt`` (temp file, then ``os.replace``), the loss CSV and the export."""
        self.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "wall_s": self.wall_s,
            "ema_loss": self.ema_loss,
            "log": torch.tensor(self.log, dtype=torch.float64).reshape(-1, len(LOG_COLUMNS)),
            "signature": json.dumps(self._signature(), sort_keys=True),
        }
        tmp = self.ckpt_path.with_name("last.pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.ckpt_path)
        self.write_log()
        self.export()

    def load_checkpoint(self) -> bool:
        """Resume from ``checkpoints/last.pt`` if present; False if there is none."""
        if not self.ckpt_path.is_file():
            return False
        state = torch.load(self.ckpt_path, map_location=self.device, weights_only=True)
        mine = json.dumps(self._signature(), sort_keys=True)
        if state["signature"] != mine:
            raise SagConfigError(f"{self.ckpt_path} was trained with {state['signature']}, the config says "
                                 f"{mine}; accepted: the same settings, or a new out_dir, or resume=false")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"].cpu())
        self.step, self.wall_s, self.ema_loss = int(state["step"]), float(state["wall_s"]), state["ema_loss"]
        self.log = state["log"].tolist()
        return True

    def write_log(self) -> None:
        path = self.out_dir / "loss.csv"
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(LOG_COLUMNS)
            for row in self.log:
                w.writerow([int(row[0]), *(f"{v:.6g}" for v in row[1:])])
        os.replace(tmp, path)

    def export(self) -> Path:
        """EMA weights as a local diffusers directory ``export/`` (unet/, scheduler/, model_index.json)."""
        final, tmp, old = (self.out_dir / n for n in ("export", "export.tmp", "export.old"))
        shutil.rmtree(tmp, ignore_errors=True)
        copy.deepcopy(self.ema).to("cpu").save_pretrained(tmp / "unet", safe_serialization=True)
        DDPMScheduler.from_config(self.scheduler_config).save_pretrained(tmp / "scheduler")
        import diffusers

        index = {"_class_name": "DDPMPipeline", "_diffusers_version": diffusers.__version__,
                 "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        meta = {"classes": list(SHAPES), "null_class": self.null_class, "step": self.step,
                "weights": "ema", "ema_decay": float(self.cfg.train.ema_decay),
                "init_from": self.cfg.get("init_from")}
        (tmp / "classes.json").write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        return final


def train(cfg: DictConfig, out_dir: str | Path, progress: bool | None = None) -> dict:
    """Train (or resume) until ``train.max_steps`` or ``train.max_minutes``, whichever comes first.

    Writes ``checkpoints/last.pt``, ``loss.csv`` and ``export/`` (EMA weights) under ``out_dir`` every
    ``train.ckpt_every`` steps and at the end; SIGTERM / Ctrl-C also stop cleanly with a checkpoint.
    Returns a summary dict.
    """
    torch.set_num_threads(int(cfg.threads))
    trainer = Trainer(cfg, out_dir)
    trainer.out_dir.mkdir(parents=True, exist_ok=True)
    resumed = bool(cfg.resume) and trainer.load_checkpoint()
    t_cfg = cfg.train
    max_steps = int(t_cfg.max_steps)
    deadline = time.monotonic() + 60 * float(t_cfg.max_minutes) if t_cfg.max_minutes is not None else math.inf
    stop = {"signal": None}

    def on_term(signum, _frame):
        stop["signal"] = signum

    previous = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    show = cfg.progress if progress is None else progress
    bar = tqdm(total=max_steps, initial=trainer.step, disable=not show, desc="train", dynamic_ncols=True)
    start_step, reason = trainer.step, "max_steps"
    try:
        while trainer.step < max_steps:
            if time.monotonic() >= deadline:
                reason = "max_minutes"
                break
            if stop["signal"] is not None:
                reason = "signal"
                break
            t0 = time.perf_counter()
            loss = trainer.train_step()
            trainer.wall_s += time.perf_counter() - t0
            trainer.log.append([trainer.step, loss, trainer.ema_loss, trainer._last_lr, trainer.wall_s])
            bar.update(1)
            bar.set_postfix(loss=f"{trainer.ema_loss:.4f}", refresh=False)
            if trainer.step % int(t_cfg.ckpt_every) == 0:
                trainer.save_checkpoint()
                if not show:  # a line per checkpoint where there is no progress bar (logs, batch jobs)
                    print(f"step {trainer.step}/{max_steps} loss {trainer.ema_loss:.4f} "
                          f"{trainer.wall_s / max(1, trainer.step - start_step):.4f} s/step", flush=True)
    except KeyboardInterrupt:
        reason = "interrupted"
    finally:
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if trainer.step != start_step or not trainer.ckpt_path.is_file() or resumed:
        trainer.save_checkpoint()
    steps = trainer.step - start_step
    return {"out_dir": str(trainer.out_dir), "step": trainer.step, "steps_this_run": steps,
            "resumed": resumed, "stopped_by": reason, "ema_loss": trainer.ema_loss,
            "export": str(trainer.out_dir / "export"), "wall_s": trainer.wall_s}


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
