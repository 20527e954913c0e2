"""Quality of guidance on paired seeds: every setting samples the same seeds and labels, then is scored
against held-out scenes in the domain classifier's feature space -> ``tables/quality.parquet``.

    python -m experiments.evaluate                       # the embedded model, seeds 0-255, DDIM 50
    python -m experiments.evaluate seeds=0-999 sag_scales=[0,0.1,0.25,0.5,1.0] metrics.draws_fd=50
    python -m experiments.evaluate debug=tiny model=tiny_pixel_cond seeds=0-7      # seconds

Settings: SAG and blur guidance over ``sag_scales``/``blur_scales`` (s = 0 is the unguided run: SAG at s = 0
is bit-for-bit unguided), CFG and CG alone and with SAG (``combos``; paper Sec. 3.2 table: SAG x CG). Each
setting samples into ``settings/<name>/`` through :func:`sag.runs.run_sampling`, so rerunning into the same
run dir (``hydra.run.dir=...``) resumes an interrupted sweep. Metrics (:mod:`sag.evaluators.quality`): fd,
precision, recall (k-NN, k = 3), class_accuracy, is_score, with bootstrap CIs over seeds; ``calls_per_image``
is counted (network evaluations per image) on one extra trajectory with a counting model.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig
from tqdm.auto import tqdm

from analysis.schemas import validate
from analysis.tables import write_table
from experiments.common import build_model, conditions, load_classifier, run_inputs, user_errors
from sag.data import make_scenes
from sag.errors import SagConfigError
from sag.evaluators import extract, inception_metrics, load_evaluator, quality_metrics
from sag.evaluators.quality import check_inception_weights
from sag.guidance import Guidance, Window, build_guidance
from sag.guidance.base import CallCounter
from sag.runs import load_samples, run_sampling
from sag.sampling import sample

NEEDS_COND = ("cfg", "cg", "sag_cfg", "sag_cg")


@dataclass(frozen=True)
class Setting:
    """One guidance setting. ``scale`` is the swept scale: s for sag/blur/sag_*, w for cfg, lambda for cg."""

    guidance: str
    scale: float = 0.0
    sag_scale: float = 0.0
    cfg_scale: float = 0.0
    cg_scale: float = 0.0
    start: float = 0.0
    stop: float = 1.0
    every: int = 1

    @property
    def kind(self) -> str:
        """What is sampled: SAG or blur at s = 0 is the unguided model (bit for bit), so it shares that run."""
        return "none" if self.guidance in ("sag", "blur") and self.sag_scale == 0 else self.guidance

    @property
    def schedule(self) -> str:
        parts = [] if (self.start, self.stop) == (0.0, 1.0) else [f"window {self.start:g}-{self.stop:g}"]
        parts += [f"every {self.every}"] if self.every > 1 else []
        return " ".join(parts) or "full"

    @property
    def name(self) -> str:
        """The run-dir name of the samples (settings that sample the same thing share it)."""
        if self.kind == "none":
            return "none"
        tags = {"sag": f"s{self.sag_scale:g}", "blur": f"s{self.sag_scale:g}", "cfg": f"w{self.cfg_scale:g}",
                "cg": f"l{self.cg_scale:g}", "sag_cfg": f"s{self.sag_scale:g}_w{self.cfg_scale:g}",
                "sag_cg": f"s{self.sag_scale:g}_l{self.cg_scale:g}"}
        name = f"{self.kind}_{tags[self.kind]}"
        name += "" if (self.start, self.stop) == (0.0, 1.0) else f"_win{self.start:g}-{self.stop:g}"
        return name + ("" if self.every == 1 else f"_every{self.every}")


def quality_settings(cfg: DictConfig, conditional: bool) -> list[Setting]:
    """The evaluate sweep: SAG and blur over their scales, then CFG / CG alone and with SAG."""
    out = [Setting("none")]
    out += [Setting("sag", float(s), sag_scale=float(s)) for s in cfg.sag_scales]
    out += [Setting("blur", float(s), sag_scale=float(s)) for s in cfg.blur_scales]
    s, w, lam = float(cfg.combo_sag_scale), float(cfg.cfg_scale), float(cfg.cg_scale)
    combos = {"cfg": Setting("cfg", w, cfg_scale=w), "cg": Setting("cg", lam, cg_scale=lam),
              "sag_cfg": Setting("sag_cfg", s, sag_scale=s, cfg_scale=w),
              "sag_cg": Setting("sag_cg", s, sag_scale=s, cg_scale=lam)}
    for c in cfg.combos:
        if c not in combos:
            raise SagConfigError(f"combos has {c!r}; accepted: {sorted(combos)}")
        if conditional:
            out.append(combos[c])
        else:
            print(f"skipping {c}: the model is unconditional")
    return out


def build(model, setting: Setting, gcfg: DictConfig, classifier=None):
    """The model call of a setting (build_guidance, then the every-k schedule on the outer window)."""
    g = build_guidance(model, setting.kind, sag_scale=setting.sag_scale, cfg_scale=setting.cfg_scale,
                       cg_scale=setting.cg_scale, layers=gcfg.layers, psi=float(gcfg.psi),
                       kernel_size=int(gcfg.kernel_size), blur_sigma=float(gcfg.blur_sigma),
                       classifier=classifier, start=setting.start, stop=setting.stop)
    if setting.every != 1:
        if not isinstance(g, Guidance):
            raise SagConfigError(f"every={setting.every} needs a guidance; {setting.kind!r} has no window")
        g.window = Window(g.window.start, g.window.stop, setting.every)
    return g


def count_calls(model, scheduler, model_fn, steps: int, cond, size) -> float:
    """Network evaluations per image (rows / images) of one single-image trajectory; the counter replaces the
    innermost model call, so the guidance's own batching (CFG's 2B) is counted as rows."""
    holder = model_fn
    while isinstance(holder, Guidance) and isinstance(holder.inner, Guidance):
        holder = holder.inner
    counter = CallCounter(holder.inner if isinstance(holder, Guidance) else model)
    if isinstance(holder, Guidance):
        holder.inner, saved = counter, holder.inner
    try:
        sample(model, scheduler, steps=steps, seeds=[0], model_fn=counter if holder is model else model_fn,
               cond=None if cond is None else cond[:1], batch_size=1, size=size, progress=False)
    finally:
        if isinstance(holder, Guidance):
            holder.inner = saved
    return float(counter.rows)


def check_images(model, size) -> None:
    h, w = size or model.sample_size
    shape = tuple(model.to_images(torch.zeros(1, model.in_channels, h, w, device=model.device, dtype=model.dtype))
                  .shape[1:])
    if shape != (3, 32, 32):
        raise SagConfigError(f"the domain evaluator scores 3x32x32 images of the embedded scenes; model "
                             f"{model.name!r} makes {'x'.join(map(str, shape))} images")


def prepare(cfg: DictConfig):
    """Validated inputs, model, scheduler, labels, evaluator and reference features (before any sampling)."""
    run = run_inputs(cfg)
    if run.shard is not None:
        raise SagConfigError("shard is not supported here: metrics need every seed; run the whole sweep")
    m = cfg.metrics
    if len(run.seeds) <= int(m.k):
        raise SagConfigError(f"seeds={cfg.seeds!r} gives {len(run.seeds)} images; accepted: more than k={m.k} "
                             "(precision/recall need k neighbours)")
    for key in ("draws", "draws_fd"):
        if int(m[key]) < 0:
            raise SagConfigError(f"metrics.{key}={m[key]}; accepted: >= 0")
    check_inception_weights(cfg.get("inception_weights"))
    model = build_model(cfg)
    scheduler = instantiate(cfg.scheduler)(model)
    check_images(model, run.size)
    cond = conditions(cfg, model, run)
    clf = load_evaluator("classifier", cfg.get("evaluator"))
    count = int(cfg.reference_count or len(run.seeds))
    reference = torch.from_numpy(make_scenes(int(cfg.reference_seed), 0, count)["image"])
    real_feats, _ = extract(clf, reference)
    return run, model, scheduler, cond, clf, reference, real_feats


def evaluate_settings(cfg: DictConfig, out: Path, settings: list[Setting], prep, table: str) -> pd.DataFrame:
    """Sample every setting (resumable, paired seeds), count its calls, score it; write ``tables/<table>``."""
    run, model, scheduler, cond, clf, reference, real_feats = prep
    noisy = load_classifier(cfg, model) if any(s.kind in ("cg", "sag_cg") for s in settings) else None
    fns = {}
    for s in settings:  # build (and validate) every setting before the first sample
        if s.name not in fns:
            fns[s.name] = build(model, s, cfg.sag, noisy if s.kind in ("cg", "sag_cg") else None)
            if hasattr(fns[s.name], "validate"):
                fns[s.name].validate(run.size or model.sample_size)
    labels = None if cond is None or model.conditioning != "class" else cond
    m = cfg.metrics
    scored: dict[str, tuple[list[dict], float, float]] = {}
    rows = []
    for s in tqdm(settings, desc="settings", unit="setting", disable=not cfg.progress):
        if s.name not in scored:
            started = time.time()
            run_sampling(model, scheduler, out / "settings" / s.name, steps=run.steps, seeds=run.seeds,
                         model_fn=fns[s.name], batch_size=run.batch_size, cond=cond, size=run.size,
                         progress=cfg.progress, meta={"guidance": asdict(s) | {"kind": s.kind}})
            _, x = load_samples(out / "settings" / s.name)
            images = model.to_images(x.to(model.device, model.dtype)).float().cpu()
            feats, logits = extract(clf, images)
            metrics = quality_metrics(real_feats, feats, logits, labels, k=int(m.k), draws=int(m.draws),
                                      draws_fd=int(m.draws_fd), seed=int(m.seed), alpha=float(m.alpha))
            for key, value in inception_metrics(cfg.get("inception_weights"), reference, images).items():
                metrics.append({"metric": key, "value": value, "ci_low": math.nan, "ci_high": math.nan,
                                "n": len(images), "draws": 0, "boot_bias": math.nan})
            calls = count_calls(model, scheduler, fns[s.name], run.steps, cond, run.size)
            scored[s.name] = (metrics, calls, time.time() - started)
        metrics, calls, wall = scored[s.name]
        for r in metrics:
            rows.append({"run": out.name, "guidance": s.guidance, "schedule": s.schedule, "scale": s.scale, **r,
                         "calls_per_image": calls, "setting": s.name, "sag_scale": s.sag_scale,
                         "cfg_scale": s.cfg_scale, "cg_scale": s.cg_scale, "start": s.start, "stop": s.stop,
                         "every": s.every, "model": model.name, "steps": run.steps, "scheduler":
                         type(scheduler).__name__, "samples": str(out / "settings" / s.name), "eval_s": wall})
    df = validate(pd.DataFrame(rows), table)
    path = write_table(df, out, table)
    if cfg.get("inception_weights") is None:
        print("inception_weights=null: standard Inception FID/IS skipped (point it to a local weights file)")
    print_table(df)
    print(f"table: {path}")
    print(f"samples: {out / 'settings'}/<setting>/samples")
    return df


def print_table(df: pd.DataFrame) -> None:
    cell = df.assign(cell=[f"{v:.4g} [{lo:.3g}, {hi:.3g}]" for v, lo, hi in zip(df.value, df.ci_low, df.ci_high)])
    keys = ["guidance", "schedule", "scale", "calls_per_image"]
    wide = cell.pivot_table(index=keys, columns="metric", values="cell", aggfunc="first", sort=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_rows", 200):
        print(wide.reset_index().to_string(index=False))


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    with user_errors():
        prep = prepare(cfg)
        settings = quality_settings(cfg, prep[1].conditioning == "class")
        print(f"evaluating {len(settings)} settings x {len(prep[0].seeds)} paired seeds on {prep[1].name} "
              f"({prep[0].steps} steps) -> {out}")
        evaluate_settings(cfg, out, settings, prep, "quality")


if __name__ == "__main__":
    main()
