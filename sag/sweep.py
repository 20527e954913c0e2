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

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from torch import Tensor, nn
from tqdm.auto import tqdm

from sag.errors import SagConfigError
from sag.evaluators.features import check_backbone, check_inception_weights
from sag.evaluators.io import evaluator_for
from sag.evaluators.quality import with_deltas
from sag.evaluators.reference import check_reference
from sag.evaluators.scoring import MetricOptions, Scorer
from sag.guidance import build_guidance
from sag.guidance.base import CallCounter, as_guidance
from sag.guidance.build import KINDS, needs_classifier
from sag.inputs import RunInputs
from sag.models import DiffusionModel
from sag.runs import load_samples, run_sampling
from sag.sampling import sample

CG_KINDS = tuple(k for k in KINDS if needs_classifier(k))  # kinds that need the noise-aware classifier
# The SAG family (sag.guidance.build): network perturbations with their own scale s, alone, with CFG (w) or inside
# classifier guidance (lambda); APG (w).
PERTURBED_KINDS = ("pag", "seg", "slg")
FAMILY_KINDS = (*PERTURBED_KINDS, *(f"{k}_cfg" for k in PERTURBED_KINDS), "apg", *(f"{k}_cg" for k in PERTURBED_KINDS))
FRONTIER_KINDS = ("sag", "blur", "sag_cfg", *PERTURBED_KINDS, *(f"{k}_cfg" for k in PERTURBED_KINDS))


@dataclass(frozen=True)
class Setting:
    """One guidance setting. ``scale`` is the swept scale: s for sag/blur/sag_*, w for cfg, lambda for cg; for
    pag/seg/slg (and their ``*_cfg`` / ``*_cg``) their own s (``cfg_scale`` holds w, ``cg_scale`` lambda), for apg
    w (= ``cfg_scale``)."""

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
        bit), so it shares that run; so is ``pag_cg`` / ``seg_cg`` / ``slg_cg`` at s = 0 classifier guidance alone."""
        off = (self.guidance in ("sag", "blur") and self.sag_scale == 0) or (
            self.guidance in (*PERTURBED_KINDS, "apg") and self.scale == 0)
        if self.guidance in {f"{k}_cg" for k in PERTURBED_KINDS} and self.scale == 0:
            return "cg"
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
        tags |= {f"{k}_cg": f"s{self.scale:g}_l{self.cg_scale:g}" for k in PERTURBED_KINDS}
        name = f"{self.kind}_{tags[self.kind]}"
        name += "" if (self.start, self.stop) == (0.0, 1.0) else f"_win{self.start:g}-{self.stop:g}"
        return name + ("" if self.every == 1 else f"_every{self.every}")


def family_setting(kind: str, family_options: Mapping | None, cfg_scale: float, start: float = 0.0,
                   stop: float = 1.0, every: int = 1, cg_scale: float | None = None) -> Setting:
    """One setting of the SAG family: pag/seg/slg at ``family_options["<term>_scale"]`` (their ``*_cfg`` with w =
    ``cfg_scale`` too, their ``*_cg`` with lambda = ``cg_scale``, which they require), apg at w = ``cfg_scale``;
    ``start``/``stop``/``every``: the perturbation window (apg: its CFG window, see :func:`build_setting`)."""
    if kind not in FAMILY_KINDS:
        raise SagConfigError(f"family has {kind!r}; accepted: {list(FAMILY_KINDS)}")
    window = {"start": float(start), "stop": float(stop), "every": every}
    w = float(cfg_scale)
    if kind == "apg":
        return Setting("apg", w, cfg_scale=w, **window)
    key = f"{kind.split('_')[0]}_scale"  # the family term: pag of pag, pag_cfg, pag_cg
    if key not in (family_options or {}):
        raise SagConfigError(f"family_options has no {key!r} for {kind}; accepted: a mapping with the "
                             "build_guidance options of the family (conf/evaluate.yaml family_options)")
    if kind.endswith("_cg") and cg_scale is None:
        raise SagConfigError(f"family has {kind!r} but no cg_scale was given; accepted: a cg_scale (lambda) with it")
    lam = float(cg_scale) if kind.endswith("_cg") else 0.0
    return Setting(kind, float(family_options[key]), cfg_scale=w if kind.endswith("_cfg") else 0.0, cg_scale=lam,
                   **window)


def family_settings(family: Sequence[str], family_options: Mapping | None, cfg_scale: float,
                    conditional: bool, cg_scale: float | None = None) -> list[Setting]:
    """The SAG family at one scale each, full window (:func:`family_setting`); kinds needing an unconditional
    branch (``*_cfg``, apg) or class labels (``*_cg``) are skipped on unconditional models, as the combos are, with
    CFG alone added before the first of the former and CG alone before the first of the latter (their reference:
    APG reshapes CFG's update, the ``*_cfg`` kinds add to it, the ``*_cg`` kinds add the family term inside CG)."""
    out: list[Setting] = []
    for kind in family:
        setting = family_setting(kind, family_options, cfg_scale, cg_scale=cg_scale)
        cg = kind.endswith("_cg")
        if (cg or setting.cfg_scale != 0) and not conditional:
            print(f"skipping {kind}: the model is unconditional")
            continue
        ref = (Setting("cg", setting.cg_scale, cg_scale=setting.cg_scale) if cg else
               Setting("cfg", float(cfg_scale), cfg_scale=float(cfg_scale)) if setting.cfg_scale != 0 else None)
        out += [ref] if ref is not None and ref not in out else []
        out.append(setting)
    return out


def quality_settings(*, sag_scales: Sequence[float], blur_scales: Sequence[float], combos: Sequence[str],
                     combo_sag_scale: float, cfg_scale: float, cg_scale: float, conditional: bool,
                     family: Sequence[str] = (), family_options: Mapping | None = None) -> list[Setting]:
    """The evaluate sweep: SAG and blur over their scales, then CFG / CG alone and with SAG (``combos``), then the
    SAG family (``family``: pag, seg, slg, their ``*_cfg`` and ``*_cg``, apg) at one scale each
    (:func:`family_settings`; ``*_cg`` at lambda = ``cg_scale``)."""
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
    return out + [f for f in family_settings(family, family_options, cfg_scale, conditional, lam) if f not in out]


def frontier_settings(*, kinds: Sequence[str], scale: float, cfg_scale: float, windows: Sequence[Sequence[float]],
                      every: Sequence[int], conditional: bool, family: Sequence[str] = (),
                      family_options: Mapping | None = None, cg_scale: float | None = None) -> list[Setting]:
    """The frontier sweep: per kind of ``kinds`` the full window, each [start, stop) of ``windows`` and each
    every-k schedule, next to the unguided run (and CFG alone before a ``*_cfg`` kind); SAG kinds at s = ``scale``,
    pag/seg/slg kinds at their ``family_options`` scale. Then ``family`` (:func:`family_settings`): one full-window
    point per kind, so the family sits on the same calls-per-image axis (``*_cg`` at lambda = ``cg_scale``; the
    classifier's gradient is not a network call, so it adds nothing to ``calls_per_image``)."""
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
    return out + [f for f in family_settings(family, family_options, w, conditional, cg_scale) if f not in out]


def build_setting(model: DiffusionModel, setting: Setting, *, layers, psi: float, kernel_size: int,
                  blur_sigma: float, map_heads="layer", classifier: nn.Module | None = None,
                  family: Mapping | None = None) -> Callable:
    """The model call of a setting (:func:`sag.guidance.build_guidance` with its window and every-k). ``family``:
    the family's ``build_guidance`` options (layers, blur, eta, ...; ``family_options`` of conf/evaluate.yaml); a
    pag/seg/slg setting's own scale replaces ``<term>_scale``. APG's window is the CFG window (cfg_start/stop)."""
    window = {"start": setting.start, "stop": setting.stop, "every": setting.every}
    if setting.kind != setting.guidance:
        window = {}  # SAG / blur / PAG / SEG / SLG at s = 0 is the unguided model (*_cg: CG alone) whatever its window
    if setting.kind == "apg":
        window = {"cfg_start": setting.start, "cfg_stop": setting.stop, "every": setting.every}
    own = dict(family or {})
    if setting.kind.split("_")[0] in PERTURBED_KINDS:  # pag, pag_cfg, pag_cg: pag's own scale
        own[f"{setting.kind.split('_')[0]}_scale"] = setting.scale
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
    the noise-aware classifier (``classifier_dir``, None = the shipped one of the model's domain) is loaded only for
    CG kinds."""
    noisy = None
    if any(s.kind in CG_KINDS for s in settings):
        noisy = evaluator_for("noisy_classifier", model, classifier_dir).to(model.device)
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


def check_inputs(run: RunInputs, metrics: MetricOptions, seeds_spec, inception_weights: str | None,
                 reference: str | None = None, backbone: str | None = None) -> None:
    """The cheap checks of a sweep, before any model is built: no shard (the metrics need every seed), enough
    images for k neighbours, non-negative draws, and the reference path, Inception weights file and backbone
    folder where given (:mod:`sag.evaluators.scoring` checks the rest once the model is built)."""
    if run.shard is not None:
        raise SagConfigError("shard is not supported here: metrics need every seed; run the whole sweep")
    metrics.check(len(run.seeds), seeds_spec)
    check_inception_weights(inception_weights)
    check_reference(reference)
    check_backbone(backbone)


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
