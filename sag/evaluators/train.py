"""Train the domain evaluators on the procedural scenes and measure them on held-out scenes.

Data: step ``k`` trains on fresh scenes ``k*B .. k*B+B-1`` of the ``domain``'s generator (``embedded-scenes``:
``make_scenes(data_seed, ...)``; ``natural-scenes``: :func:`sag.data.natural.make_natural_scenes`) (default
data_seed 1; ``pool_size: N`` draws from N fixed scenes instead) with a random horizontal flip; the
held-out set is scenes ``0 .. eval_size-1`` of ``eval_seed`` (default 2). Both differ from the diffusion
model's training data (``data_seed: 0`` in ``conf/train.yaml``), so the evaluators never saw the scenes the
generator was fit to.

* ``classifier``: cross-entropy on the label of the largest object.
* ``noisy_classifier``: cross-entropy on ``x_t = sqrt(ab) x0 + sqrt(1 - ab) eps`` with a float t uniform in
  [0, 999] under :data:`sag.models.tiny.PIXEL_SCHEDULE` (:meth:`sag.schedule.VPSchedule.add_noise`, which
  interpolates log-sigma between integer steps as Euler-type samplers do).
* ``segmenter``: binary cross-entropy on ``object_mask``.

Optimiser: AdamW, linear warmup then cosine decay to ``min_lr_ratio * lr``. The decay follows whichever
budget is closer to running out, ``steps`` or ``max_minutes`` (so a time-limited run still ends at a small
learning rate); with ``max_minutes: null`` a run is a deterministic function of its config. The loop
(budgets, progress bar, loss log, SIGTERM / Ctrl-C) is :func:`sag.train_loop.run_loop`; this module supplies
each kind's batch and loss of step ``k``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sag.data.scenes import SHAPES
from sag.domains import EMBEDDED, check_known, scene_maker
from sag.errors import SagConfigError
from sag.evaluators.io import save_evaluator
from sag.evaluators.metrics import accuracy, frechet_distance, mask_iou
from sag.evaluators.nets import EVALUATORS, build_evaluator, num_parameters
from sag.models.tiny import PIXEL_SCHEDULE, _alphas_cumprod
from sag.schedule import VPSchedule
from sag.train_loop import LoopSettings, LoopState, pool_indices, run_loop, seed_from, write_loss_csv

EVAL_BATCH = 250
LOG_COLUMNS = ("step", "loss", "lr", "wall_s")  # of loss.csv (a subset of sag.train_loop.LOG_COLUMNS)
LOSS_SMOOTHING = 0.95  # final_loss = the loss smoothed as s = 0.95 s + 0.05 loss


def pixel_schedule() -> VPSchedule:
    """The VP schedule the noisy classifier is trained under (DDPM linear betas 1e-4..0.02, 1000 steps)."""
    return VPSchedule(_alphas_cumprod(PIXEL_SCHEDULE))


def _positive_int(name: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise SagConfigError(f"{name}={v!r}; accepted: a positive integer")
    return v


def _settings(kind: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Validated settings of one kind (top-level keys plus the ``cfg[kind]`` section), as a new dict."""
    if kind not in EVALUATORS:
        raise SagConfigError(f"evaluator kind {kind!r}; accepted: {sorted(EVALUATORS)}")
    if kind not in cfg:
        raise SagConfigError(f"the config has no section {kind!r}")
    s = {k: cfg.get(k, d) for k, d in (("seed", 0), ("data_seed", 1), ("eval_seed", 2), ("domain", EMBEDDED),
                                       ("eval_size", 2000), ("t_buckets", [0, 250, 500, 750, 1000]))}
    check_known(s["domain"], "train_evaluators domain")
    s.update(cfg[kind])
    missing = [k for k in ("steps", "batch_size", "lr") if k not in s]
    if missing:
        raise SagConfigError(f"{kind} section lacks {missing}")
    for name in ("steps", "batch_size", "eval_size"):
        _positive_int(f"{kind}.{name}" if name != "eval_size" else name, s[name])
    if s["data_seed"] == s["eval_seed"]:
        raise SagConfigError(f"data_seed and eval_seed are both {s['data_seed']}; accepted: different seeds")
    mm = s.get("max_minutes")
    if mm is not None and not float(mm) > 0:
        raise SagConfigError(f"{kind}.max_minutes={mm!r}; accepted: a positive number or null")
    b = s["t_buckets"]
    if kind == "noisy_classifier" and (len(b) < 2 or any(lo >= hi for lo, hi in zip(b, b[1:])) or b[0] < 0
                                        or b[-1] > 1000):
        raise SagConfigError(f"t_buckets={b}; accepted: increasing edges within [0, 1000]")
    s.setdefault("arch", {})
    s.setdefault("warmup_steps", 50)
    s.setdefault("min_lr_ratio", 0.02)
    s.setdefault("weight_decay", 0.01)
    s.setdefault("grad_clip", 1.0)
    s.setdefault("flip", True)
    s.setdefault("init_from", None)
    s.setdefault("pool_size", 0)
    if not isinstance(s["pool_size"], int) or s["pool_size"] < 0:
        raise SagConfigError(f"{kind}.pool_size={s['pool_size']!r}; accepted: 0 (fresh scenes) or a positive "
                             "integer")
    return s


def _warm_start(model, init_from: str, out_dir: Path) -> dict[str, Any]:
    """Copy every same-named, same-shaped tensor of a saved evaluator into ``model``.

    ``init_from``: a saved evaluator directory, or a kind whose directory is ``<out_dir>/<kind>`` (e.g. the
    noisy classifier starts from the clean classifier: its convolutions, norms and head carry over; the
    time MLP and the FiLM layers, zero-initialised, make it start as exactly the clean classifier).
    """
    src = Path(init_from)
    if not src.is_absolute() and not (src / "model.safetensors").is_file():
        src = out_dir / init_from
    weights = src / "model.safetensors"
    if not weights.is_file():
        raise SagConfigError(f"init_from={init_from!r}: {weights} does not exist; accepted: a saved evaluator "
                             f"directory or a kind already trained into {out_dir}")
    saved = load_file(str(weights))
    own = model.state_dict()
    take = {k: v for k, v in saved.items() if k in own and own[k].shape == v.shape}
    if not take:
        raise SagConfigError(f"init_from={init_from!r}: no tensor of {weights} fits this architecture")
    model.load_state_dict(take, strict=False)
    return {"path": str(src), "tensors": len(take), "of": len(own)}


def _batch(kind: str, s: dict, step: int, schedule: VPSchedule | None, pool: dict | None = None):
    """(input, target, t or None) of training step ``step``: a pure function of (seeds, step).

    Without a pool step k sees fresh scenes k*B .. k*B+B-1; with one, B scenes drawn from the pool.
    """
    b = s["batch_size"]
    if pool is None:
        d = scene_maker(s["domain"])(s["data_seed"], step * b, b)
    else:
        idx = pool_indices(s["data_seed"], step, len(pool["label"]), b)
        d = {k: pool[k][idx] for k in ("image", "label", "object_mask")}
    x = torch.from_numpy(d["image"])
    target = torch.from_numpy(d["object_mask"]).float()[:, None] if kind == "segmenter" else torch.from_numpy(
        d["label"])
    g = torch.Generator().manual_seed(seed_from(s["seed"], step))
    if s["flip"]:
        flip = torch.rand(b, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if kind == "segmenter":
            target = torch.where(flip[:, None, None, None], target.flip(-1), target)
    t = None
    if kind == "noisy_classifier":
        t = torch.rand(b, generator=g, dtype=torch.float64) * (schedule.num_train_timesteps - 1)
        x = schedule.add_noise(x, torch.randn(x.shape, generator=g), t)
    return x, target, t


def _loss(kind: str, model, x, target, t):
    if kind == "segmenter":
        return F.binary_cross_entropy_with_logits(model(x), target)
    return F.cross_entropy(model(x, t) if t is not None else model(x), target)


@torch.no_grad()
def evaluate(kind: str, model, s: dict) -> dict[str, Any]:
    """Held-out metrics on scenes ``0 .. eval_size-1`` of ``eval_seed``."""
    model.eval()
    d = scene_maker(s["domain"])(s["eval_seed"], 0, s["eval_size"])
    x_all = torch.from_numpy(d["image"])
    n = len(x_all)
    out: dict[str, Any] = {"eval_seed": s["eval_seed"], "eval_size": n}
    chunks = range(0, n, EVAL_BATCH)
    if kind == "classifier":
        logits = torch.cat([model(x_all[i:i + EVAL_BATCH]) for i in chunks])
        labels = torch.from_numpy(d["label"])
        out["accuracy"] = accuracy(logits, labels)
        out["loss"] = float(F.cross_entropy(logits, labels))
        pred = logits.argmax(1)
        out["per_class_accuracy"] = {name: float((pred[labels == c] == c).float().mean())
                                     for c, name in enumerate(SHAPES) if (labels == c).any()}
        feats = torch.cat([model.features(x_all[i:i + EVAL_BATCH]) for i in chunks])
        half = n // 2
        out["fd_heldout_halves"] = frechet_distance(feats[:half], feats[half:2 * half])  # sampling noise floor
    elif kind == "noisy_classifier":
        schedule = pixel_schedule()
        labels = torch.from_numpy(d["label"])
        edges = s["t_buckets"]
        g = torch.Generator().manual_seed(seed_from(s["eval_seed"], 7))
        per_bucket, t0_logits = {}, []
        for lo, hi in zip(edges, edges[1:]):
            t = lo + torch.rand(n, generator=g, dtype=torch.float64) * (min(hi, 1000) - lo)
            t = t.clamp_max(schedule.num_train_timesteps - 1)
            x_t = schedule.add_noise(x_all, torch.randn(x_all.shape, generator=g), t)
            logits = torch.cat([model(x_t[i:i + EVAL_BATCH], t[i:i + EVAL_BATCH]) for i in chunks])
            per_bucket[f"[{lo},{hi})"] = accuracy(logits, labels)
        t0_logits = torch.cat([model(x_all[i:i + EVAL_BATCH], torch.zeros(len(x_all[i:i + EVAL_BATCH])))
                               for i in chunks])
        out["accuracy_t0"] = accuracy(t0_logits, labels)
        out["accuracy_per_t_bucket"] = per_bucket
        out["accuracy"] = float(np.mean(list(per_bucket.values())))  # ~ t uniform over the buckets' range
    else:
        masks = torch.from_numpy(d["object_mask"])
        logits = torch.cat([model(x_all[i:i + EVAL_BATCH]) for i in chunks])
        pred = torch.sigmoid(logits)[:, 0] > 0.5
        out["iou"] = mask_iou(pred, masks)
        out["pixel_accuracy"] = float((pred == masks).float().mean())
        out["loss"] = float(F.binary_cross_entropy_with_logits(logits, masks.float()[:, None]))
    return out


def _build(kind: str, s: dict[str, Any], out_dir: Path):
    """(model at its seeded init or warm start, warm-start info or None)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(s["seed"]))
        model = build_evaluator(kind, **s["arch"])
    warm = _warm_start(model, s["init_from"], out_dir) if s["init_from"] else None
    return model, warm


def _loop_settings(kind: str, s: dict[str, Any], progress: bool) -> LoopSettings:
    """Warmup then cosine decay to ``min_lr_ratio * lr`` over the closer of ``steps`` / ``max_minutes``."""
    return LoopSettings(max_steps=s["steps"], lr=float(s["lr"]), warmup_steps=s["warmup_steps"],
                        min_lr_ratio=float(s["min_lr_ratio"]), max_minutes=s.get("max_minutes"),
                        grad_clip=s["grad_clip"], smoothing=LOSS_SMOOTHING, progress=progress, desc=kind)


def train_evaluator(kind: str, cfg: Mapping[str, Any], out_dir: str | Path,
                    progress: bool | None = None) -> dict[str, Any]:
    """Train one evaluator, measure it on held-out scenes and save it to ``<out_dir>/<kind>/``.

    ``cfg`` (a plain dict, e.g. ``OmegaConf.to_container(cfg, resolve=True)``): top-level ``seed``,
    ``data_seed``, ``eval_seed``, ``eval_size``, ``t_buckets``, ``progress`` and a section ``cfg[kind]`` with
    ``arch`` (constructor arguments), ``steps``, ``batch_size``, ``lr``, ``max_minutes`` (null: no time
    budget) and optionally ``warmup_steps``, ``min_lr_ratio``, ``weight_decay``, ``grad_clip``, ``flip``,
    ``init_from`` (warm start, see :func:`_warm_start`), ``pool_size`` (0: fresh scenes every step; N: draw
    from N fixed scenes). Writes ``model.safetensors``, ``config.json`` (architecture, training settings,
    held-out metrics) and ``loss.csv``. Returns a summary dict. Ctrl-C / SIGTERM stop training early; the
    model is still evaluated and saved.
    """
    s = _settings(kind, cfg)
    model, warm = _build(kind, s, Path(out_dir))
    schedule = pixel_schedule() if kind == "noisy_classifier" else None
    pool = scene_maker(s["domain"])(s["data_seed"], 0, s["pool_size"]) if s["pool_size"] else None
    if progress is None:
        progress = bool(cfg.get("progress", True))
    from sag.training import resolve_device

    device = resolve_device(str(cfg.get("device", "cpu")))  # batches are drawn on the CPU, then moved
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=float(s["lr"]), weight_decay=float(s["weight_decay"]))

    def loss(k: int) -> torch.Tensor:
        x, target, t = _batch(kind, s, k, schedule, pool)
        return _loss(kind, model, x.to(device), target.to(device), None if t is None else t.to(device))

    state, start = LoopState(), time.monotonic()
    reason = run_loop(model, opt, loss, state, _loop_settings(kind, s, progress))
    model.to("cpu")  # held-out metrics and the saved weights: on the CPU
    reason = "steps" if reason == "max_steps" else reason  # the evaluator configs call the step budget `steps`
    train_s = time.monotonic() - start
    return _evaluate_and_save(kind, model, s, state, reason, train_s, warm, Path(out_dir) / kind)


def _evaluate_and_save(kind: str, model, s: dict[str, Any], state: LoopState, reason: str, train_s: float,
                       warm: dict | None, out: Path) -> dict[str, Any]:
    """Held-out metrics, then ``loss.csv``, ``model.safetensors`` and ``config.json`` in ``out``."""
    t0 = time.monotonic()
    metrics = evaluate(kind, model, s)
    eval_s = time.monotonic() - t0
    step = state.step
    training = {k: v for k, v in s.items() if k not in ("arch", "eval_size", "eval_seed", "t_buckets")}
    training.update(steps_done=step, stopped_by=reason, train_s=round(train_s, 1),
                    examples_seen=step * s["batch_size"], final_loss=state.ema_loss, warm_start=warm,
                    schedule=dict(PIXEL_SCHEDULE) if kind == "noisy_classifier" else None)
    out.mkdir(parents=True, exist_ok=True)
    write_loss_csv(out / "loss.csv", state.log, LOG_COLUMNS)
    weights = save_evaluator(model, out, info={"training": training, "metrics": metrics})
    return {"kind": kind, "out_dir": str(out), "weights": str(weights), "weights_bytes": weights.stat().st_size,
            "parameters": num_parameters(model), "steps": step, "stopped_by": reason,
            "train_s": round(train_s, 1), "eval_s": round(eval_s, 1), "metrics": metrics}
