"""Run directories: sampling with attention capture streamed to ``samples/`` and ``records/``.

A run dir is complete when ``run.json`` says ``"status": "complete"``; it is written last, atomically.
Rerunning into the same dir resumes: finished batches are skipped by their ``samples/batch-*.safetensors``,
an interrupted batch continues from its last saved iteration (``.state/``), and the outputs equal an
uninterrupted run's bit for bit on the CPU.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from sag.capture import AttentionStore, CaptureSpec, capture_attention
from sag.errors import SagConfigError
from sag.io import atomic_path, atomic_write_bytes
from sag.models.base import DiffusionModel
from sag.pixels import to_uint8
from sag.records import RecordWriter
from sag.sampling import StepInfo, sample
from sag.seeds import format_seeds
from sag.sizes import check_size
from sag.spill import FullSpill
from sag.word_maps import WordColumns, recorder_for_run

RUN_FILE = "run.json"
STATE_DIR = ".state"  # sampler checkpoints and the run's resume key; removed when the run completes
SPILL_DIR = ".spill"  # under records/: capture=full's probabilities on their way to a shard (sag.spill)
RUN_FORMAT_VERSION = 1


def save_grid(images: np.ndarray, path: Path, ncol: int = 8) -> None:
    """Write (n, H, W, C) uint8 ``images`` as one PNG grid (``ncol`` per row, 2 px white gaps), atomically."""
    n, h, w, c = images.shape
    ncol = min(ncol, n)
    nrow = -(-n // ncol)
    grid = np.full((nrow * (h + 2) + 2, ncol * (w + 2) + 2, c), 255, np.uint8)
    for k, im in enumerate(images):
        r, q = divmod(k, ncol)
        grid[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + q * (w + 2) : 2 + q * (w + 2) + w] = im
    with atomic_path(path) as tmp:  # the temp name ends in .tmp: name the format
        Image.fromarray(grid.squeeze(-1) if c == 1 else grid).save(tmp, format="PNG")


# ---- sample batches: samples/batch-<bi>.safetensors = {"x": (b, C, H, W)} + metadata {"seeds": [...]} ----------


def batch_path(samples_dir: Path, batch_index: int) -> Path:
    """Where sample batch ``batch_index`` of a run is stored."""
    return samples_dir / f"batch-{batch_index:05d}.safetensors"


def write_batch(path: Path, x: Tensor, seeds: list[int]) -> None:
    """Atomically write one batch of model-space samples and its seeds."""
    with atomic_path(path) as tmp:
        save_file({"x": x.contiguous()}, tmp, metadata={"seeds": json.dumps(seeds)})


def batch_seeds(path: Path) -> list[int]:
    """The seeds of a sample batch file (reads only its header)."""
    with safe_open(str(path), framework="pt") as f:
        return [int(s) for s in json.loads(f.metadata()["seeds"])]


def read_batch(path: Path) -> tuple[list[int], Tensor]:
    """(seeds, samples (b, C, H, W)) of a sample batch file."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["seeds"]), f.get_tensor("x")


def load_samples(run_dir: str | Path) -> tuple[list[int], Tensor]:
    """(seeds, model-space samples) from every ``samples/batch-*.safetensors`` of a run."""
    seeds: list[int] = []
    xs: list[Tensor] = []
    for p in sorted((Path(run_dir) / "samples").glob("batch-*.safetensors")):
        bseeds, x = read_batch(p)
        seeds += bseeds
        xs.append(x)
    if not xs:
        raise FileNotFoundError(f"{Path(run_dir) / 'samples'}: no sample batches")
    order = np.argsort(seeds)
    return [seeds[i] for i in order], torch.cat(xs)[torch.as_tensor(order)]


class _RunOutputs:
    """The run dir side of sampling: records per step, images and sample batches per batch, finished batches."""

    def __init__(self, model: DiffusionModel, out: Path, capture: CaptureSpec | None, info: dict, step_extras=None,
                 word_columns: WordColumns | None = None):
        self.model, self.samples_dir, self.capture, self.step_extras = model, out / "samples", capture, step_extras
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        self.writer = RecordWriter(out / "records", capture.dtype, meta=info) if capture else None
        # full: each chunk straight to a file, deleted once its shard is written; a new run clears leftovers
        full = capture is not None and "full" in capture.reductions
        self.store = AttentionStore(FullSpill(out / "records" / SPILL_DIR, capture.dtype) if full else None)
        self.words = recorder_for_run(model, out, capture, word_columns, out / STATE_DIR)  # capture.word_maps

    def attention(self):
        """The capture context (a no-op without a capture spec); it yields the store ``on_step`` pops."""
        c, net = self.capture, self.model.net
        if c is None:
            return nullcontext(self.store)
        ctx = capture_attention(net, c.layers, c.reductions, c.include_cross, c.query_stride, store=self.store,
                                exact=c.exact, chunk_bytes=c.chunk_bytes, lse_maps=c.lse_maps)
        return ctx if self.words is None else self.words.around(ctx)  # + the word maps' hooks (sag.word_maps)

    def on_step(self, s: StepInfo) -> None:
        records = self.store.pop()  # this step's maps; popping keeps memory flat over steps
        extras = {"x0": s.denoised} if self.capture.record_x0 else {}
        extras |= self.step_extras(s) if self.step_extras else {}  # e.g. the guidance's passes (sag.stages)
        self.writer.write_step(batch_index=s.batch_index, step=s.step, num_steps=s.num_steps, t=s.t,
                               seeds=s.seeds, records=records, extras=extras)
        if self.store.spill is not None:
            self.store.spill.clear()  # the step's full records are in its shard now
        if self.words is not None:
            self.words.on_step(s)

    def on_batch_end(self, bi: int, bseeds: list[int], x: Tensor) -> None:
        images = to_uint8(self.model.to_images(x.to(self.model.device, self.model.dtype)))
        for s, im in zip(bseeds, images):
            Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im).save(self.samples_dir / f"{s:06d}.png")
        if self.words is not None:  # before the samples batch, which marks the batch done
            self.words.write(bi, bseeds, tuple(x.shape[-2:]))
        write_batch(batch_path(self.samples_dir, bi), x, bseeds)

    def done_batch(self, bi: int, bseeds: list[int]) -> Tensor | None:
        path = batch_path(self.samples_dir, bi)
        if not path.is_file():
            return None
        saved, x = read_batch(path)
        if saved != list(bseeds):
            raise SagConfigError(f"{path}: holds other seeds than batch {bi} {bseeds}; use a new run dir")
        return x


def _run_info(model: DiffusionModel, scheduler: SchedulerMixin, steps: int, seeds: list[int], batch_size: int,
              size: tuple[int, int] | None, capture: CaptureSpec | None, meta: dict | None) -> dict:
    """The run's configuration as written to run.json (and hashed into its resume key)."""
    return {"format_version": RUN_FORMAT_VERSION, "model": model.describe(), "scheduler": type(scheduler).__name__,
            # private diffusers keys (e.g. _use_default_values, filled from a set) vary between processes
            "scheduler_config": {k: v for k, v in scheduler.config.items() if not k.startswith("_")},
            "steps": steps, "seeds": format_seeds(seeds),
            "batch_size": batch_size, "size": list(size) if size else None,
            "capture": asdict(capture) if capture else None, "guidance": (meta or {}).get("guidance"),
            **({"passes": meta["passes"]} if (meta or {}).get("passes") else {})}  # sag.stages: recorded passes


def run_sampling(
    model: DiffusionModel,
    scheduler: SchedulerMixin,
    out_dir: str | Path,
    *,
    steps: int,
    seeds: list[int],
    capture: CaptureSpec | None = None,
    model_fn=None,
    batch_size: int = 8,
    cond: Tensor | None = None,
    size: tuple[int, int] | None = None,
    meta: dict | None = None,
    progress: bool = True,
    check_finite: bool = True,
    step_extras: Callable[[StepInfo], dict[str, Tensor]] | None = None,
    word_columns: WordColumns | None = None,
) -> dict:
    """Sample ``seeds`` with ``model_fn`` (a guidance wrapper; default the model); write images and samples
    to ``samples/`` and (if ``capture``) attention records of every step to ``records/``. Returns the
    manifest written to ``run.json``. Capture records every model call of each step (call 0 first);
    ``step_extras(step_info)`` adds per-step records beside ``x0`` (needs ``capture``); ``capture.word_maps``
    records the prompt words' cross-attention maps at the columns ``word_columns`` (:mod:`sag.word_maps`)."""
    out = Path(out_dir)
    check_size(model, size)  # before anything is written: a size the network cannot take fails here
    if step_extras is not None and capture is None:
        raise SagConfigError("step_extras are written with the records; accepted: a capture spec with them")
    info = _run_info(model, scheduler, steps, seeds, batch_size, size, capture, meta)
    done = _resume_or_start(out, info)
    if done is not None:
        return done
    info.update({k: v for k, v in (meta or {}).items() if k not in info})
    outputs = _RunOutputs(model, out, capture, info, step_extras, word_columns)
    started = time.time()
    try:
        with outputs.attention():
            x = sample(model, scheduler, steps=steps, seeds=seeds, model_fn=model_fn, cond=cond,
                       batch_size=batch_size, size=size, callback=outputs.on_step if outputs.writer else None,
                       on_batch_end=outputs.on_batch_end, progress=progress, done_batch=outputs.done_batch,
                       checkpoint_dir=out / STATE_DIR, check_finite=check_finite)
    except BaseException:
        _forget_if_nothing_saved(out)
        raise
    save_grid(to_uint8(model.to_images(x[:64].to(model.device, model.dtype))), outputs.samples_dir / "grid.png")
    manifest = dict(info, status="complete", wall_s=round(time.time() - started, 3),
                    samples=str(outputs.samples_dir), records=str(out / "records") if outputs.writer else None)
    if outputs.writer:
        manifest["record_rows"] = int(len(outputs.writer.close()))
    atomic_write_bytes(out / RUN_FILE, json.dumps(manifest, indent=2, default=str).encode())
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    return manifest


def _forget_if_nothing_saved(out: Path) -> None:
    """After a failed run that saved no sample batch and no sampler state: remove its resume key, so a corrected
    rerun into the same dir (e.g. with another size) is not refused as another configuration."""
    state = out / STATE_DIR
    saved = any(p.name != "key.json" for p in state.glob("*")) if state.is_dir() else False
    if not saved and not any((out / "samples").glob("batch-*.safetensors")):
        (state / "key.json").unlink(missing_ok=True)


def _resume_key(info: dict) -> str:
    return json.dumps(info, sort_keys=True, default=str)


def _resume_or_start(out: Path, info: dict) -> dict | None:
    """The finished manifest if ``out`` already holds this run; else record the run's key for resuming.

    A run dir that holds an unfinished run of a *different* configuration is refused."""
    key_file = out / STATE_DIR / "key.json"
    run_file = out / RUN_FILE
    if run_file.is_file():
        try:
            manifest = json.loads(run_file.read_text())
        except json.JSONDecodeError as e:
            raise SagConfigError(f"{run_file}: corrupt ({e}); delete it to resume the run") from None
        if manifest.get("format_version") != RUN_FORMAT_VERSION:
            raise SagConfigError(f"{run_file}: run format {manifest.get('format_version')!r}, this version writes "
                                 f"{RUN_FORMAT_VERSION}; use a new run dir")
        if manifest.get("status") == "complete" and manifest.get("resume_key") == _resume_key(info):
            print(f"{out}: already complete, nothing to do")
            return manifest
        raise SagConfigError(f"{out} holds a finished run of another configuration; use a new run dir")
    key = _resume_key(info)
    if key_file.is_file() and key_file.read_text() != key:
        raise SagConfigError(f"{out} holds an interrupted run of another configuration ({key_file}); resume it "
                             "with the same settings or use a new run dir")
    if not key_file.is_file():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(key_file, key.encode())
    elif (out / "samples").is_dir():
        print(f"{out}: resuming an interrupted run")
    info["resume_key"] = key
    return None
