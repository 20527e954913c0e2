"""Run directories: sampling with attention capture streamed to ``samples/`` and ``records/``.

A run dir is complete when ``run.json`` says ``"status": "complete"``; it is written last, atomically.
"""

from __future__ import annotations

import json
import time
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
from sag.models.base import DiffusionModel
from sag.records import RecordWriter, atomic_write_bytes
from sag.sampling import StepInfo, sample
from sag.seeds import format_seeds

RUN_FILE = "run.json"


def to_uint8(images: Tensor) -> np.ndarray:
    """(n, C, H, W) in [-1, 1] -> (n, H, W, C) uint8."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: np.ndarray, path: Path, ncol: int = 8) -> None:
    n, h, w, c = images.shape
    ncol = min(ncol, n)
    nrow = -(-n // ncol)
    grid = np.full((nrow * (h + 2) + 2, ncol * (w + 2) + 2, c), 255, np.uint8)
    for k, im in enumerate(images):
        r, q = divmod(k, ncol)
        grid[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + q * (w + 2) : 2 + q * (w + 2) + w] = im
    Image.fromarray(grid.squeeze(-1) if c == 1 else grid).save(path)


def load_samples(run_dir: str | Path) -> tuple[list[int], Tensor]:
    """(seeds, model-space samples) from every ``samples/batch-*.safetensors`` of a run."""
    seeds: list[int] = []
    xs: list[Tensor] = []
    for p in sorted((Path(run_dir) / "samples").glob("batch-*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            seeds += json.loads(f.metadata()["seeds"])
            xs.append(f.get_tensor("x"))
    if not xs:
        raise FileNotFoundError(f"{Path(run_dir) / 'samples'}: no sample batches")
    order = np.argsort(seeds)
    return [seeds[i] for i in order], torch.cat(xs)[torch.as_tensor(order)]


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
) -> dict:
    """Sample ``seeds`` with ``model_fn`` (a guidance wrapper; default the model); write images and samples
    to ``samples/`` and (if ``capture``) attention records of every step to ``records/``. Returns the
    manifest written to ``run.json``. Capture records the first model call of each step (call 0)."""
    out = Path(out_dir)
    samples_dir = out / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    info = {"model": model.describe(), "scheduler": type(scheduler).__name__, "steps": steps,
            "seeds": format_seeds(seeds), "batch_size": batch_size,
            "capture": asdict(capture) if capture else None, **(meta or {})}
    writer = RecordWriter(out / "records", capture.dtype, meta=info) if capture else None
    ctx = (capture_attention(model.net, capture.layers, capture.reductions, capture.include_cross,
                             capture.query_stride, exact=capture.exact) if capture else nullcontext(AttentionStore()))
    started = time.time()

    with ctx as store:

        def on_step(s: StepInfo) -> None:
            records = store.pop()  # this step's maps; popping keeps memory flat over steps
            extras = {"x0": s.denoised} if capture.record_x0 else None
            writer.write_step(batch_index=s.batch_index, step=s.step, num_steps=s.num_steps, t=s.t,
                              seeds=s.seeds, records=records, extras=extras)

        def on_batch_end(bi: int, bseeds: list[int], x: Tensor) -> None:
            images = to_uint8(model.to_images(x.to(model.device, model.dtype)))
            for s, im in zip(bseeds, images):
                Image.fromarray(im.squeeze(-1) if im.shape[-1] == 1 else im).save(samples_dir / f"{s:06d}.png")
            path = samples_dir / f"batch-{bi:05d}.safetensors"
            tmp = path.with_name(path.name + ".tmp")
            save_file({"x": x.contiguous()}, tmp, metadata={"seeds": json.dumps(bseeds)})
            tmp.replace(path)

        x = sample(model, scheduler, steps=steps, seeds=seeds, model_fn=model_fn, cond=cond, batch_size=batch_size,
                   size=size, callback=on_step if writer else None, on_batch_end=on_batch_end, progress=progress)

    save_grid(to_uint8(model.to_images(x[:64].to(model.device, model.dtype))), samples_dir / "grid.png")
    manifest = dict(info, status="complete", wall_s=round(time.time() - started, 3),
                    samples=str(samples_dir), records=str(out / "records") if writer else None)
    if writer:
        manifest["record_rows"] = int(len(writer.close()))
    atomic_write_bytes(out / RUN_FILE, json.dumps(manifest, indent=2, default=str).encode())
    return manifest
