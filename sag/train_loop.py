"""One optimisation loop for every network trained in sag (the diffusion UNet, the domain evaluators).

A task supplies the loss of step ``k``; the loop does the rest: learning-rate schedule, backward pass,
gradient clipping, optimiser step, an optional after-update hook (EMA), budgets in steps and in minutes,
progress bar, loss log, periodic checkpoints and a clean stop on SIGTERM / Ctrl-C.

Determinism: a task draws every random number of step ``k`` from generators seeded by
:func:`seed_from` ``(seed, k)`` (and the scenes from ``(data_seed, k)``), and the learning rate is a
function of ``k`` (and of the time budget, when one is set). So a run resumed from a checkpoint
(:func:`save_checkpoint` / :func:`load_checkpoint`) repeats exactly the steps an uninterrupted run takes.
"""

from __future__ import annotations

import csv
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sag.errors import SagConfigError
from sag.io import atomic_path

# Columns of LoopState.log; ema_loss = smoothing * ema_loss + (1 - smoothing) * loss (display only).
LOG_COLUMNS = ("step", "loss", "ema_loss", "lr", "wall_s")


def seed_from(*words: int) -> int:
    """A 63-bit seed from a tuple of integers (numpy SeedSequence hashing)."""
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def pool_indices(data_seed: int, step: int, pool_size: int, batch_size: int) -> np.ndarray:
    """The ``batch_size`` pool indices of step ``step``, drawn from ``default_rng([data_seed, step, 1])``."""
    return np.random.default_rng([data_seed, step, 1]).integers(0, pool_size, batch_size)


def lr_factor(step: int, progress: float, warmup_steps: int, min_ratio: float = 1.0) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from 1 to ``min_ratio`` as progress goes 0 -> 1.

    ``min_ratio = 1`` is warmup then constant (DDPM: 5000 warmup steps, then a constant 2e-4); the factor
    is then exactly the warmup factor.
    """
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    cos = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return warm * cos


@dataclass
class LoopSettings:
    """What the loop needs to know about one run (the task's own settings stay with the task)."""

    max_steps: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float = 1.0  # 1: constant after warmup; < 1: cosine decay over the closer budget
    max_minutes: float | None = None  # wall-clock budget of this invocation; None: steps only
    grad_clip: float | None = None  # max gradient norm; None or 0: no clipping
    smoothing: float = 0.98  # of the displayed ema_loss
    ckpt_every: int | None = None  # call ``checkpoint`` every this many steps
    progress: bool = True
    desc: str = "train"


@dataclass
class LoopState:
    """Where a run stands: steps done, seconds spent in steps (over all invocations), smoothed loss, log."""

    step: int = 0
    wall_s: float = 0.0
    ema_loss: float | None = None
    log: list[list[float]] = field(default_factory=list)  # rows of LOG_COLUMNS

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint entries of the loop (``log`` as a float64 tensor)."""
        return {"step": self.step, "wall_s": self.wall_s, "ema_loss": self.ema_loss,
                "log": torch.tensor(self.log, dtype=torch.float64).reshape(-1, len(LOG_COLUMNS))}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.step, self.wall_s, self.ema_loss = int(state["step"]), float(state["wall_s"]), state["ema_loss"]
        self.log = state["log"].tolist()


class _StopFlag:
    """Records SIGTERM (in the main thread only) until closed; Ctrl-C arrives as KeyboardInterrupt."""

    def __init__(self) -> None:
        self.signal: int | None = None
        main = threading.current_thread() is threading.main_thread()
        self._previous = signal.signal(signal.SIGTERM, self._on_term) if main else None

    def _on_term(self, signum, _frame) -> None:
        self.signal = signum

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _optimize(model, opt, loss_fn, step: int, lr: float, grad_clip, after_update) -> float:
    """One update: set lr, loss of step ``step``, backward, clip, optimiser step, hook. Returns the loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    model.train()
    loss = loss_fn(step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(grad_clip))
    opt.step()
    if after_update is not None:
        after_update(step)
    return float(loss.detach())


def _record(state: LoopState, loss: float, lr: float, smoothing: float) -> None:
    state.step += 1
    state.ema_loss = loss if state.ema_loss is None else smoothing * state.ema_loss + (1 - smoothing) * loss
    state.log.append([state.step, loss, state.ema_loss, lr, state.wall_s])


def run_loop(model: torch.nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable[[int], torch.Tensor],
             state: LoopState, settings: LoopSettings, *, after_update: Callable[[int], None] | None = None,
             checkpoint: Callable[[LoopState], None] | None = None) -> str:
    """Train from ``state.step`` until ``max_steps`` or ``max_minutes``, whichever comes first.

    ``loss_fn(k)`` returns the scalar loss of step ``k``; ``after_update(k)`` runs after the optimiser
    step (e.g. the EMA update); ``checkpoint(state)`` every ``ckpt_every`` steps. The learning rate of step
    ``k`` is ``lr * lr_factor(k, progress)``, progress being the larger used fraction of the two budgets.
    Returns why it stopped: ``max_steps``, ``max_minutes``, ``signal`` (SIGTERM) or ``interrupted`` (Ctrl-C);
    the caller saves its final state.
    """
    s = settings
    budget_s = 60 * float(s.max_minutes) if s.max_minutes is not None else math.inf
    start, start_step, reason = time.monotonic(), state.step, "max_steps"
    stop = _StopFlag()
    bar = tqdm(total=s.max_steps, initial=state.step, disable=not s.progress, desc=s.desc, dynamic_ncols=True)
    try:
        while state.step < s.max_steps:
            elapsed = time.monotonic() - start
            if elapsed >= budget_s:
                reason = "max_minutes"
                break
            if stop.signal is not None:
                reason = "signal"
                break
            progress = max(state.step / s.max_steps, elapsed / budget_s)
            lr = s.lr * lr_factor(state.step, progress, s.warmup_steps, s.min_lr_ratio)
            t0 = time.perf_counter()
            loss = _optimize(model, opt, loss_fn, state.step, lr, s.grad_clip, after_update)
            state.wall_s += time.perf_counter() - t0
            _record(state, loss, lr, s.smoothing)
            bar.update(1)
            bar.set_postfix(loss=f"{state.ema_loss:.4f}", refresh=False)
            if checkpoint is not None and s.ckpt_every and state.step % s.ckpt_every == 0:
                checkpoint(state)
                if not s.progress:  # a line per checkpoint where there is no progress bar (logs, batch jobs)
                    print(f"step {state.step}/{s.max_steps} loss {state.ema_loss:.4f} "
                          f"{state.wall_s / max(1, state.step - start_step):.4f} s/step", flush=True)
    except KeyboardInterrupt:
        reason = "interrupted"
    finally:
        bar.close()
        stop.close()
    return reason


def write_loss_csv(path: str | Path, log: Sequence[Sequence[float]], columns: Sequence[str] = LOG_COLUMNS) -> None:
    """Write ``log`` (rows of :data:`LOG_COLUMNS`) as CSV with the chosen ``columns``, atomically."""
    pick = [LOG_COLUMNS.index(c) for c in columns]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for row in log:
            w.writerow([int(row[0]), *(f"{row[i]:.6g}" for i in pick[1:])])


def save_checkpoint(path: str | Path, state: LoopState, modules: Mapping[str, Any], signature: Mapping) -> None:
    """``torch.save`` the modules' state dicts, the loop state, the torch RNG and ``signature`` atomically.

    ``modules``: name -> anything with ``state_dict()`` (network, EMA copy, optimiser). ``signature``: the
    settings a resume must match (JSON-serialisable).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {name: m.state_dict() for name, m in modules.items()}
    payload.update(state.state_dict(), torch_rng=torch.get_rng_state(),
                   signature=json.dumps(signature, sort_keys=True))
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, state: LoopState, modules: Mapping[str, Any], signature: Mapping,
                    device: str | torch.device = "cpu") -> bool:
    """Resume from ``path`` if present (False if there is none); the saved signature must equal ``signature``."""
    path = Path(path)
    if not path.is_file():
        return False
    saved = torch.load(path, map_location=device, weights_only=True)
    mine = json.dumps(signature, sort_keys=True)
    if saved["signature"] != mine:
        raise SagConfigError(f"{path} was trained with {saved['signature']}, the config says {mine}; accepted: "
                             "the same settings, or a new out_dir, or resume=false")
    for name, m in modules.items():
        m.load_state_dict(saved[name])
    torch.set_rng_state(saved["torch_rng"].cpu())
    state.load_state_dict(saved)
    return True
