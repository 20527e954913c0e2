"""The guidance sweep: sample every setting on the same seeds and labels, count its model calls, score it.

A :class:`Setting` is one guidance configuration (kind, scales, window, every-k). :func:`quality_settings` and
:func:`frontier_settings` build the two sweeps (scale sweep with CFG/CG combos, paper Sec. 3.2 table: SAG x CG;
the quality-cost frontier of windows and every-k schedules). :func:`evaluate_settings` samples each setting
into ``<out>/settings/<name>/`` through :func:`sag.runs.run_sampling` (resumable), counts network evaluations
per image with :class:`sag.guidance.base.CallCounter`, scores the images with a :class:`Scorer` and returns the
tidy rows as a DataFrame (the caller validates and writes the table), each with its paired delta against the
sweep's unguided setting (same seeds, same bootstrap draws: :func:`sag.evaluators.quality.paired_delta`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from sag.data import make_scenes
from sag.domains import DECLARE, require_domain
from sag.errors import SagConfigError
from sag.evaluators import extract, inception_metrics, load_evaluator, load_noisy_classifier
from sag.evaluators.quality import bootstrap_quality, check_inception_weights, with_deltas
from sag.guidance import build_guidance
from sag.guidance.base import CallCounter, as_guidance
from sag.inputs import RunInputs
from sag.models import DiffusionModel
from sag.runs import load_samples, run_sampling
from sag.sampling import sample

CG_KINDS = ("cg", "sag_cg")  # kinds that need the noise-aware classifier
# The SAG family (sag.guidance.build): network perturbations with their own scale s, alone or with CFG; APG (w).
PERTURBED_KINDS = ("pag", "seg", "slg")
FAMILY_KINDS = (*PERTURBED_KINDS, *(f"{k}_cfg" for k in PERTURBED_KINDS), "apg")
FRONTIER_KINDS = ("sag", "blur", "sag_cfg", *PERTURBED_KINDS, *(f"{k}_cfg" for k in PERTURBED_KINDS))


@dataclass(frozen=True)
class Setting:
    """One guidance setting. ``scale`` is the swept scale: s for sag/blur/sag_*, w for cfg, lambda for cg; for
    pag/seg/slg (and their ``*_cfg``) their own s (``cfg_scale`` holds w), for apg w (= ``cfg_scale``)."""

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
        """What is sampled: SAG, blur, PAG, SEG or SLG at s = 0 (and APG at w = 0) is the unguided model (bit for
        bit), so it shares that run."""
        off = (self.guidance in ("sag", "blur") and self.sag_scale == 0) or (
            self.guidance in (*PERTURBED_KINDS, "apg") and self.scale == 0)
        return "none" if off else self.guidance

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
                "sag_cg": f"s{self.sag_scale:g}_l{self.cg_scale:g}", "apg": f"w{self.cfg_scale:g}"}
        tags |= {k: f"s{self.scale:g}" for k in PERTURBED_KINDS}
        tags |= {f"{k}_cfg": f"s{self.scale:g}_w{self.cfg_scale:g}" for k in PERTURBED_KINDS}
        name = f"{self.kind}_{tags[self.kind]}"
        name += "" if (self.start, self.stop) == (0.0, 1.0) else f"_win{self.start:g}-{self.stop:g}"
        return name + ("" if self.every == 1 else f"_every{self.every}")


def family_setting(kind: str, family_options: Mapping | None, cfg_scale: float, start: float = 0.0,
                   stop: float = 1.0, every: int = 1) -> Setting:
    """One setting of the SAG family: pag/seg/slg at ``family_options["<term>_scale"]`` (their ``*_cfg`` with w =
    ``cfg_scale`` too), apg at w = ``cfg_scale``; ``start``/``stop``/``every``: the perturbation window (apg: its
    CFG window, see :func:`build_setting`)."""
    if kind not in FAMILY_KINDS:
        raise SagConfigError(f"family has {kind!r}; accepted: {list(FAMILY_KINDS)}")
    window = {"start": float(start), "stop": float(stop), "every": every}
    w = float(cfg_scale)
    if kind == "apg":
        return Setting("apg", w, cfg_scale=w, **window)
    key = f"{kind.removesuffix('_cfg')}_scale"
    if key not in (family_options or {}):
        raise SagConfigError(f"family_options has no {key!r} for {kind}; accepted: a mapping with the "
                             "build_guidance options of the family (conf/evaluate.yaml family_options)")
    return Setting(kind, float(family_options[key]), cfg_scale=w if kind.endswith("_cfg") else 0.0, **window)


def family_settings(family: Sequence[str], family_options: Mapping | None, cfg_scale: float,
                    conditional: bool) -> list[Setting]:
    """The SAG family at one scale each, full window (:func:`family_setting`); kinds needing an unconditional
    branch (``*_cfg``, apg) are skipped on unconditional models, with CFG alone added before the first of them
    (their reference: APG reshapes CFG's update, the ``*_cfg`` kinds add to it)."""
    out: list[Setting] = []
    for kind in family:
        setting = family_setting(kind, family_options, cfg_scale)
        if setting.cfg_scale != 0 and not conditional:
            print(f"skipping {kind}: the model is unconditional")
            continue
        cfg = Setting("cfg", float(cfg_scale), cfg_scale=float(cfg_scale))
        out += [cfg] if setting.cfg_scale != 0 and cfg not in out else []
        out.append(setting)
    return out


def quality_settings(*, sag_scales: Sequence[float], blur_scales: Sequence[float], combos: Sequence[str],
                     combo_sag_scale: float, cfg_scale: float, cg_scale: float, conditional: bool,
                     family: Sequence[str] = (), family_options: Mapping | None = None) -> list[Setting]:
    """The evaluate sweep: SAG and blur over their scales, then CFG / CG alone and with SAG (``combos``), then the
    SAG family (``family``: pag, seg, slg, their ``*_cfg``, apg) at one scale each (:func:`family_settings`)."""
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
    return out + [f for f in family_settings(family, family_options, cfg_scale, conditional) if f not in out]


def frontier_settings(*, kinds: Sequence[str], scale: float, cfg_scale: float, windows: Sequence[Sequence[float]],
                      every: Sequence[int], conditional: bool, family: Sequence[str] = (),
                      family_options: Mapping | None = None) -> list[Setting]:
    """The frontier sweep: per kind of ``kinds`` the full window, each [start, stop) of ``windows`` and each
    every-k schedule, next to the unguided run (and CFG alone before a ``*_cfg`` kind); SAG kinds at s = ``scale``,
    pag/seg/slg kinds at their ``family_options`` scale. Then ``family`` (:func:`family_settings`): one full-window
    point per kind, so the family sits on the same calls-per-image axis."""
    s, w = float(scale), float(cfg_scale)
    out = [Setting("none")]
    for kind in kinds:
        if kind not in FRONTIER_KINDS:
            raise SagConfigError(f"kinds has {kind!r}; accepted: {list(FRONTIER_KINDS)}")
        if kind.endswith("_cfg") and not conditional:
            print(f"skipping {kind}: the model is unconditional")
            continue
        if kind.endswith("_cfg") and Setting("cfg", w, cfg_scale=w) not in out:
            out.append(Setting("cfg", w, cfg_scale=w))
        for window in windows:
            if len(window) != 2:
                raise SagConfigError(f"windows has {list(window)}; accepted: [start, stop] pairs of fractions")
        for k in every:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise SagConfigError(f"every has {k!r}; accepted: positive integers")
        schedules = [{}, *({"start": float(a), "stop": float(b)} for a, b in windows), *({"every": k} for k in every)]
        for sched in schedules:
            if kind in FAMILY_KINDS:
                out.append(family_setting(kind, family_options, w, **sched))
            else:
                out.append(Setting(kind, s, sag_scale=s, cfg_scale=w if kind == "sag_cfg" else 0.0, **sched))
    return out + [f for f in family_settings(family, family_options, w, conditional) if f not in out]


def build_setting(model: DiffusionModel, setting: Setting, *, layers, psi: float, kernel_size: int,
                  blur_sigma: float, map_heads="layer", classifier: nn.Module | None = None,
                  family: Mapping | None = None) -> Callable:
    """The model call of a setting (:func:`sag.guidance.build_guidance` with its window and every-k). ``family``:
    the family's ``build_guidance`` options (layers, blur, eta, ...; ``family_options`` of conf/evaluate.yaml); a
    pag/seg/slg setting's own scale replaces ``<term>_scale``. APG's window is the CFG window (cfg_start/stop)."""
    window = {"start": setting.start, "stop": setting.stop, "every": setting.every}
    if setting.kind == "none" and setting.guidance != "none":
        window = {}  # SAG / blur / PAG / SEG / SLG at s = 0 is the unguided model whatever its window (s = 0)
    if setting.kind == "apg":
        window = {"cfg_start": setting.start, "cfg_stop": setting.stop, "every": setting.every}
    own = dict(family or {})
    if setting.kind.removesuffix("_cfg") in PERTURBED_KINDS:
        own[f"{setting.kind.removesuffix('_cfg')}_scale"] = setting.scale
    return build_guidance(model, setting.kind, sag_scale=setting.sag_scale, cfg_scale=setting.cfg_scale,
                          cg_scale=setting.cg_scale, layers=layers, psi=float(psi), kernel_size=int(kernel_size),
                          blur_sigma=float(blur_sigma), map_heads=map_heads, classifier=classifier,
                          **own, **window)


def build_settings(model: DiffusionModel, settings: Sequence[Setting], size: tuple[int, int] | None, *,
                   sag: Mapping, classifier_dir: str | None = None, family: Mapping | None = None
                   ) -> dict[str, Callable]:
    """Build and validate the model call of every distinct setting (keyed by name) before the first sample.
    ``sag`` holds the degradation shared by every SAG / blur setting (layers, psi, kernel_size, blur_sigma,
    map_heads); ``family`` the SAG family's options (:func:`build_setting`);
    the noise-aware classifier (``classifier_dir``, None = the embedded one) is loaded only for CG kinds."""
    noisy = None
    if any(s.kind in CG_KINDS for s in settings):
        noisy = load_noisy_classifier(classifier_dir).to(model.device)
    fns: dict[str, Callable] = {}
    for s in settings:
        if s.name not in fns:
            fns[s.name] = build_setting(model, s, **sag, classifier=noisy if s.kind in CG_KINDS else None,
                                        family=family)
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
    """Fail unless the model declares the embedded domain (sag.domains: the scene classifier and the reference scenes
    of :class:`Scorer` describe that domain only) and makes 3x32x32 images, the only size the classifier scores."""
    require_domain(model, "quality scoring (the scene classifier's features against the embedded domain's reference "
                   "scenes)", [DECLARE, "(not built yet) a reference set of your own (an image folder or .npz "
                                        "batch) with a feature network (a local Inception or transformers backbone)"])
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
        return self.score_draws(images)[0]

    def score_draws(self, images: Tensor) -> tuple[list[dict], dict[str, np.ndarray]]:
        """(:meth:`score` rows, per-draw bootstrap values per metric) of ``images`` in [-1, 1]
        (:func:`sag.evaluators.quality.bootstrap_quality`; Inception metrics have no draws)."""
        m = self.metrics
        feats, logits = extract(self.classifier, images)
        rows, draws = bootstrap_quality(self.real_feats, feats, logits, self.labels, k=m.k, draws=m.draws,
                                        draws_fd=m.draws_fd, seed=m.seed, alpha=m.alpha)
        for key, value in inception_metrics(self.inception_weights, self.reference, images).items():
            rows.append({"metric": key, "value": value, "ci_low": math.nan, "ci_high": math.nan,
                         "n": len(images), "draws": 0, "boot_bias": math.nan})
            draws[key] = np.empty(0)
        return rows, draws


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


@dataclass
class Scored:
    """One sampled and scored setting: metric rows, per-draw bootstrap values per metric (kept in memory for the
    paired deltas), counted network evaluations per image, wall seconds."""

    rows: list[dict]
    draws: dict[str, np.ndarray]
    calls: float
    seconds: float


def _sample_and_score(sweep: Sweep, out: Path, setting: Setting, fn, progress: bool) -> Scored:
    """Sample one setting into ``out/settings/<name>`` (resumable), score it and count its calls."""
    model, run = sweep.model, sweep.run
    started = time.time()
    run_dir = out / "settings" / setting.name
    run_sampling(model, sweep.scheduler, run_dir, steps=run.steps, seeds=run.seeds, model_fn=fn,
                 batch_size=run.batch_size, cond=sweep.cond, size=run.size, progress=progress,
                 meta={"guidance": asdict(setting) | {"kind": setting.kind}})
    _, x = load_samples(run_dir)
    rows, draws = sweep.scorer.score_draws(model.to_images(x.to(model.device, model.dtype)).float().cpu())
    calls = count_calls(model, sweep.scheduler, fn, run.steps, sweep.cond, run.size)
    return Scored(rows, draws, calls, time.time() - started)


BASELINE = "none"  # the unguided setting's name: every sweep's paired deltas are taken against it


def evaluate_settings(sweep: Sweep, out: str | Path, settings: Sequence[Setting], fns: Mapping[str, Callable], *,
                      progress: bool = True) -> pd.DataFrame:
    """Sample every setting (resumable, paired seeds), count its calls, score it: one row per setting and
    metric, in settings order (settings sharing a name share its samples and scores). ``fns``: the model calls
    of :func:`build_settings`. Every row carries the paired delta against the unguided setting (``BASELINE``,
    sampled once; :func:`sag.evaluators.quality.with_deltas`): delta, delta_ci_low, delta_ci_high, differs. A
    sweep without the unguided setting is refused before sampling."""
    if not any(s.name == BASELINE for s in settings):
        raise SagConfigError(f"settings {[s.name for s in settings]} lack the unguided setting; accepted: a sweep "
                             "that includes guidance none (the baseline of the paired deltas)")
    out = Path(out)
    scored: dict[str, Scored] = {}
    for s in tqdm(settings, desc="settings", unit="setting", disable=not progress):
        if s.name not in scored:
            scored[s.name] = _sample_and_score(sweep, out, s, fns[s.name], progress)
    alpha, base = sweep.scorer.metrics.alpha, scored[BASELINE]
    rows = []
    for s in settings:
        sc = scored[s.name]
        for r in with_deltas(sc.rows, sc.draws, base.rows, base.draws, alpha):
            rows.append({"run": out.name, "guidance": s.guidance, "window": s.window_label, "scale": s.scale, **r,
                         "calls_per_image": sc.calls, "setting": s.name, "sag_scale": s.sag_scale,
                         "cfg_scale": s.cfg_scale, "cg_scale": s.cg_scale, "start": s.start, "stop": s.stop,
                         "every": s.every, "model": sweep.model.name, "steps": sweep.run.steps,
                         "scheduler": type(sweep.scheduler).__name__, "samples": str(out / "settings" / s.name),
                         "eval_s": sc.seconds})
    return pd.DataFrame(rows)
