"""The guidance sweep: sample every setting on the same seeds and labels, count its model calls, score it.

A :class:`Setting` is one guidance configuration (kind, scales, window, every-k). :func:`quality_settings` and
:func:`frontier_settings` build the two sweeps (scale sweep with CFG/CG combos, paper Sec. 3.2 table: SAG x CG;
the quality-cost frontier of windows and every-k schedules). :func:`evaluate_settings` samples each setting
into ``<out>/settings/<name>/`` through :func:`sag.runs.run_sampling` (resumable), counts network evaluations
per image with :class:`sag.guidance.base.CallCounter`, scores the images with a :class:`Scorer` and returns the
tidy rows as a DataFrame (the caller validates and writes the table).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sag.data import make_scenes
from sag.errors import SagConfigError
from sag.evaluators import extract, inception_metrics, load_evaluator, load_noisy_classifier, quality_metrics
from sag.evaluators.quality import check_inception_weights
from sag.guidance import build_guidance
from sag.guidance.base import CallCounter, as_guidance
from sag.inputs import RunInputs
from sag.models import DiffusionModel
from sag.runs import load_samples, run_sampling
from sag.sampling import sample

CG_KINDS = ("cg", "sag_cg")  # kinds that need the noise-aware classifier
FRONTIER_KINDS = ("sag", "blur", "sag_cfg")


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
    def window_label(self) -> str:
        """The guidance window in words: "full", "window a-b", "every k" or both (the tables' ``window``)."""
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


def quality_settings(*, sag_scales: Sequence[float], blur_scales: Sequence[float], combos: Sequence[str],
                     combo_sag_scale: float, cfg_scale: float, cg_scale: float, conditional: bool) -> list[Setting]:
    """The evaluate sweep: SAG and blur over their scales, then CFG / CG alone and with SAG (``combos``)."""
    out = [Setting("none")]
    out += [Setting("sag", float(s), sag_scale=float(s)) for s in sag_scales]
    out += [Setting("blur", float(s), sag_scale=float(s)) for s in blur_scales]
    s, w, lam = float(combo_sag_scale), float(cfg_scale), float(cg_scale)
    known = {"cfg": Setting("cfg", w, cfg_scale=w), "cg": Setting("cg", lam, cg_scale=lam),
             "sag_cfg": Setting("sag_cfg", s, sag_scale=s, cfg_scale=w),
             "sag_cg": Setting("sag_cg", s, sag_scale=s, cg_scale=lam)}
    for c in combos:
        if c not in known:
            raise SagConfigError(f"combos has {c!r}; accepted: {sorted(known)}")
        if conditional:
            out.append(known[c])
        else:
            print(f"skipping {c}: the model is unconditional")
    return out


def frontier_settings(*, kinds: Sequence[str], scale: float, cfg_scale: float, windows: Sequence[Sequence[float]],
                      every: Sequence[int], conditional: bool) -> list[Setting]:
    """The frontier sweep at one scale: per kind the full window, each [start, stop) of ``windows`` and each
    every-k schedule, next to the unguided run (and CFG alone before sag_cfg)."""
    s, w = float(scale), float(cfg_scale)
    out = [Setting("none")]
    for kind in kinds:
        if kind not in FRONTIER_KINDS:
            raise SagConfigError(f"kinds has {kind!r}; accepted: {list(FRONTIER_KINDS)}")
        if kind == "sag_cfg" and not conditional:
            print("skipping sag_cfg: the model is unconditional")
            continue
        base = {"sag_scale": s, "cfg_scale": w if kind == "sag_cfg" else 0.0}
        if kind == "sag_cfg":
            out.append(Setting("cfg", w, cfg_scale=w))
        out.append(Setting(kind, s, **base))
        for window in windows:
            if len(window) != 2:
                raise SagConfigError(f"windows has {list(window)}; accepted: [start, stop] pairs of fractions")
            out.append(Setting(kind, s, start=float(window[0]), stop=float(window[1]), **base))
        for k in every:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise SagConfigError(f"every has {k!r}; accepted: positive integers")
            out.append(Setting(kind, s, every=k, **base))
    return out


def build_setting(model: DiffusionModel, setting: Setting, *, layers, psi: float, kernel_size: int,
                  blur_sigma: float, map_heads="layer", classifier: nn.Module | None = None) -> Callable:
    """The model call of a setting (:func:`sag.guidance.build_guidance` with its window and every-k)."""
    window = {"start": setting.start, "stop": setting.stop, "every": setting.every}
    if setting.kind == "none" and setting.guidance != "none":
        window = {}  # SAG / blur at s = 0 is the unguided model whatever its window (Eq. 16 with s = 0)
    return build_guidance(model, setting.kind, sag_scale=setting.sag_scale, cfg_scale=setting.cfg_scale,
                          cg_scale=setting.cg_scale, layers=layers, psi=float(psi), kernel_size=int(kernel_size),
                          blur_sigma=float(blur_sigma), map_heads=map_heads, classifier=classifier,
                          **window)


def build_settings(model: DiffusionModel, settings: Sequence[Setting], size: tuple[int, int] | None, *,
                   sag: Mapping, classifier_dir: str | None = None) -> dict[str, Callable]:
    """Build and validate the model call of every distinct setting (keyed by name) before the first sample.
    ``sag`` holds the degradation shared by every SAG / blur setting (layers, psi, kernel_size, blur_sigma,
    map_heads);
    the noise-aware classifier (``classifier_dir``, None = the embedded one) is loaded only for CG kinds."""
    noisy = None
    if any(s.kind in CG_KINDS for s in settings):
        noisy = load_noisy_classifier(classifier_dir).to(model.device)
    fns: dict[str, Callable] = {}
    for s in settings:
        if s.name not in fns:
            fns[s.name] = build_setting(model, s, **sag, classifier=noisy if s.kind in CG_KINDS else None)
            as_guidance(fns[s.name]).validate(size or model.sample_size)
    return fns


def count_calls(model: DiffusionModel, scheduler, model_fn: Callable, steps: int, cond: Tensor | None,
                size: tuple[int, int] | None) -> float:
    """Network evaluations per image (rows / images) of one single-image trajectory: a forward hook on the
    network counts every row it evaluates, so the guidance's own batching (CFG's 2B) is counted as rows."""
    with CallCounter(model.net) as counter:
        sample(model, scheduler, steps=steps, seeds=[0], model_fn=model_fn,
               cond=None if cond is None else cond[:1], batch_size=1, size=size, progress=False)
    return float(counter.rows)


def check_images(model: DiffusionModel, size: tuple[int, int] | None) -> None:
    """Fail unless the model makes 3x32x32 images, the only size the domain evaluator scores."""
    h, w = size or model.sample_size
    x = torch.zeros(1, model.in_channels, h, w, device=model.device, dtype=model.dtype)
    shape = tuple(model.to_images(x).shape[1:])
    if shape != (3, 32, 32):
        raise SagConfigError(f"the domain evaluator scores 3x32x32 images of the embedded scenes; model "
                             f"{model.name!r} makes {'x'.join(map(str, shape))} images")


@dataclass(frozen=True)
class MetricOptions:
    """Options of :func:`sag.evaluators.quality_metrics`: k-NN size, bootstrap draws (FD separately), the
    bootstrap seed (the same draws for every setting: paired) and the CI level."""

    k: int
    draws: int
    draws_fd: int
    seed: int
    alpha: float

    def __post_init__(self) -> None:  # config values may arrive as strings or floats: coerce once
        for key in ("k", "draws", "draws_fd", "seed"):
            object.__setattr__(self, key, int(getattr(self, key)))
        object.__setattr__(self, "alpha", float(self.alpha))

    def check(self, n_images: int, seeds_spec) -> None:
        """Fail before sampling when ``n_images`` cannot give k neighbours or a draw count is negative."""
        if n_images <= self.k:
            raise SagConfigError(f"seeds={seeds_spec!r} gives {n_images} images; accepted: more than k={self.k} "
                                 "(precision/recall need k neighbours)")
        for key in ("draws", "draws_fd"):
            if getattr(self, key) < 0:
                raise SagConfigError(f"metrics.{key}={getattr(self, key)}; accepted: >= 0")


@dataclass
class Scorer:
    """The domain classifier and held-out reference scenes every setting is scored against."""

    classifier: nn.Module
    reference: Tensor  # held-out scenes in [-1, 1]
    real_feats: Tensor
    labels: Tensor | None  # class labels of the sampled seeds (class accuracy), None otherwise
    metrics: MetricOptions
    inception_weights: str | None = None

    @classmethod
    def load(cls, *, evaluator: str | None, reference_seed: int, reference_count: int, labels: Tensor | None,
             metrics: MetricOptions, inception_weights: str | None = None) -> Scorer:
        """The evaluator (None = the embedded one) and the features of ``reference_count`` scenes drawn with
        data seed ``reference_seed``."""
        clf = load_evaluator("classifier", evaluator)
        reference = torch.from_numpy(make_scenes(int(reference_seed), 0, int(reference_count))["image"])
        real_feats, _ = extract(clf, reference)
        return cls(clf, reference, real_feats, labels, metrics, inception_weights)

    def score(self, images: Tensor) -> list[dict]:
        """Metric rows (metric, value, ci_low, ci_high, n, draws, boot_bias) of ``images`` in [-1, 1]."""
        m = self.metrics
        feats, logits = extract(self.classifier, images)
        rows = quality_metrics(self.real_feats, feats, logits, self.labels, k=m.k, draws=m.draws,
                               draws_fd=m.draws_fd, seed=m.seed, alpha=m.alpha)
        for key, value in inception_metrics(self.inception_weights, self.reference, images).items():
            rows.append({"metric": key, "value": value, "ci_low": math.nan, "ci_high": math.nan,
                         "n": len(images), "draws": 0, "boot_bias": math.nan})
        return rows


def check_inputs(run: RunInputs, metrics: MetricOptions, seeds_spec, inception_weights: str | None) -> None:
    """The cheap checks of a sweep, before any model is built: no shard (the metrics need every seed), enough
    images for k neighbours, non-negative draws, and the Inception weights file if one is given."""
    if run.shard is not None:
        raise SagConfigError("shard is not supported here: metrics need every seed; run the whole sweep")
    metrics.check(len(run.seeds), seeds_spec)
    check_inception_weights(inception_weights)


@dataclass
class Sweep:
    """What every setting of a sweep shares, validated before any sampling: the run inputs, the model and its
    sampler, the seeds' conditions and the scorer."""

    run: RunInputs
    model: DiffusionModel
    scheduler: object
    cond: Tensor | None
    scorer: Scorer


def _sample_and_score(sweep: Sweep, out: Path, setting: Setting, fn, progress: bool) -> tuple[list[dict], float, float]:
    """(metric rows, calls per image, seconds) of one setting sampled into ``out/settings/<name>``."""
    model, run = sweep.model, sweep.run
    started = time.time()
    run_dir = out / "settings" / setting.name
    run_sampling(model, sweep.scheduler, run_dir, steps=run.steps, seeds=run.seeds, model_fn=fn,
                 batch_size=run.batch_size, cond=sweep.cond, size=run.size, progress=progress,
                 meta={"guidance": asdict(setting) | {"kind": setting.kind}})
    _, x = load_samples(run_dir)
    metrics = sweep.scorer.score(model.to_images(x.to(model.device, model.dtype)).float().cpu())
    calls = count_calls(model, sweep.scheduler, fn, run.steps, sweep.cond, run.size)
    return metrics, calls, time.time() - started


def evaluate_settings(sweep: Sweep, out: str | Path, settings: Sequence[Setting], fns: Mapping[str, Callable], *,
                      progress: bool = True) -> pd.DataFrame:
    """Sample every setting (resumable, paired seeds), count its calls, score it: one row per setting and
    metric, in settings order (settings sharing a name share its samples and scores). ``fns``: the model calls
    of :func:`build_settings`."""
    out = Path(out)
    scored: dict[str, tuple[list[dict], float, float]] = {}
    rows = []
    for s in tqdm(settings, desc="settings", unit="setting", disable=not progress):
        if s.name not in scored:
            scored[s.name] = _sample_and_score(sweep, out, s, fns[s.name], progress)
        metrics, calls, wall = scored[s.name]
        for r in metrics:
            rows.append({"run": out.name, "guidance": s.guidance, "window": s.window_label, "scale": s.scale, **r,
                         "calls_per_image": calls, "setting": s.name, "sag_scale": s.sag_scale,
                         "cfg_scale": s.cfg_scale, "cg_scale": s.cg_scale, "start": s.start, "stop": s.stop,
                         "every": s.every, "model": sweep.model.name, "steps": sweep.run.steps,
                         "scheduler": type(sweep.scheduler).__name__, "samples": str(out / "settings" / s.name),
                         "eval_s": wall})
    return pd.DataFrame(rows)
