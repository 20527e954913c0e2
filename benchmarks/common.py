"""What the benchmarks share: dtypes, per-model guidance settings from ``conf/``, timing, the machine, the table."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import pandas as pd
import torch

from analysis.schemas import validate
from analysis.tables import write_table

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The benchmarks live next to conf/ (an editable install or a checkout): the per-model SAG settings are read there.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GUIDANCE_KEYS = ("layers", "psi", "kernel_size", "blur_sigma", "sag_scale", "cfg_scale", "cg_scale", "pag_scale",
                 "pag_layers", "seg_scale", "seg_layers", "seg_blur_sigma", "slg_scale", "slg_layers", "apg_eta",
                 "apg_norm_threshold", "apg_momentum")


def model_guidance(name: str, conf_dir: str | Path = CONF_DIR) -> dict:
    """``build_guidance`` keyword arguments of ``conf/model_guidance/<name>.yaml`` over ``_base.yaml``, composed
    by Hydra as the entry points do (a file's own ``defaults`` list is followed)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    folder = Path(conf_dir).resolve() / "model_guidance"
    if not (folder / f"{name}.yaml").is_file():
        have = sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))
        raise SystemExit(f"no {folder / name}.yaml; accepted: {have}")
    with initialize_config_dir(str(folder), version_base="1.3"):
        base, own = compose(config_name="_base"), compose(config_name=name)
    cfg = OmegaConf.to_container(OmegaConf.merge(base, own), resolve=True)
    return {k: cfg[k] for k in GUIDANCE_KEYS if k in cfg}


def bench_cond(model, n: int, device) -> torch.Tensor | None:
    """A benchmark's condition for ``n`` images: class labels 0..n-1 modulo the classes, a seeded random (n, 77, 768)
    text embedding (SDXL: the packed null_text shape), or None for an unconditional model."""
    if model.conditioning == "class":
        return torch.arange(n, device=device) % model.num_classes
    if model.conditioning == "text":
        shape = model.null_text.shape[1:]
        return torch.randn(n, *shape, generator=torch.Generator().manual_seed(1)).to(device, model.dtype)
    return None


def timed(fn, device: torch.device) -> tuple[float, float]:
    """Run ``fn()``: (seconds, peak accelerator MiB; NaN on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated(device) / 2**20
    return time.perf_counter() - t0, float("nan")


def machine(device: torch.device) -> str:
    """The accelerator's name, or the CPU and its torch thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} cpu, {torch.get_num_threads()} threads"


def append_bench(rows: list[dict], meta: dict, out: str | Path) -> tuple[pd.DataFrame, Path]:
    """Rows (+ the run's ``meta`` columns) appended to ``<out>/tables/bench.parquet``; (whole table, path)."""
    df = validate(pd.DataFrame([{**r, **meta} for r in rows]), "bench")
    path = Path(out) / "tables" / "bench.parquet"
    if path.is_file():
        df = pd.concat([pd.read_parquet(path), df], ignore_index=True)
    return df, write_table(df, out, "bench")
