"""``build_guidance``: one named guidance kind (``conf/guidance/*.yaml``) from flat options, one rule for them all.

Kinds (``KINDS``) and the terms they are made of (``TERMS``): ``none``; ``cfg`` (classifier-free guidance); ``cg``
(classifier guidance); ``sag`` (paper Eq. 16); ``blur`` (SAG's degradation with a mask of ones); ``sag_cfg`` (Eq. 25:
SAG built on the unconditional branch + CFG); ``sag_cg`` (classifier guidance around SAG); ``pag`` / ``pag_cfg``
(Perturbed-Attention Guidance, :mod:`sag.guidance.pag`); ``seg`` / ``seg_cfg`` (Smoothed Energy Guidance,
:mod:`sag.guidance.seg`); ``slg`` / ``slg_cfg`` (Skip Layer Guidance, :mod:`sag.guidance.slg`); ``apg`` (Adaptive
Projected Guidance in place of CFG, :mod:`sag.guidance.apg`); ``pag_cg`` / ``seg_cg`` / ``slg_cg`` (classifier
guidance around PAG / SEG / SLG, as ``sag_cg`` around SAG). Classifier guidance composes around any other in Python:
``ClassifierGuidance(model, classifier, inner=build_guidance(model, "pag_cfg", ...))``. Kinds whose guidance has a
degraded pass (:data:`PASS_KINDS`: SAG, blur, PAG, SEG, SLG and their combinations) keep the x0 and eps of both passes
of the last guided call on ``last_passes`` (:func:`passes_of`).

One rule: every option belongs to one term and means the same in every kind that has the term. A *window* option
of a term the kind lacks is refused (:class:`SagConfigError`) unless left at its neutral value; the *settings* of a
term the kind lacks (scales, layers, psi, blur, eta, ...) are ignored, so that one ``conf/model_guidance/<model>.yaml``
serves every kind. The windows are fixed here: callers do not replace ``.window`` or ``.inner`` afterwards (count
calls with ``CallCounter(model.net)``).

Options of :func:`build_guidance` (term in brackets):

* ``model``: the ``DiffusionModel`` (schedule, prediction type, conditioning, network for the layers).
* ``kind``: one of ``KINDS``.
* ``sag_scale`` [sag/blur]: s of Eq. 16 / 25 (0 = off; the official code's ``--guide_scale`` flag is 1 + s).
* ``layers`` [sag]: self-attention layer name patterns (glob or ``re:``; several give the union of their masks)
  whose received attention makes SAG's mask M_t (blur's mask is all ones).
* ``psi`` [sag]: mask threshold on received attention, > 0 (mean over keys = 1; 1.0 = the official ``> 1.0``).
* ``kernel_size`` [sag/blur]: odd size of the Gaussian blur of the x0 estimate, <= the sample's smaller side
  (pixels, or latent cells for latent models). ``blur_sigma`` [sag/blur]: its standard deviation, > 0.
* ``map_heads`` [sag]: heads of the mask's map: ``"layer"``, ``"official"`` (the official code's ADM ``num_heads``
  grouping) or n; ``resolve_map_heads``.
* ``cfg_scale`` [cfg, apg]: w of eps_u + (1 + w)(eps_c - eps_u) (0 = conditional only; diffusers'
  ``guidance_scale`` is 1 + w); in ``*_cfg`` kinds the CFG term beside the other term; APG's w.
* ``cg_scale`` [cg]: lambda, the gradient's scale (0 = off; the official ``--classifier_scale``).
* ``classifier`` [cg]: noise-aware ``classifier(x_t, t) -> logits``; required by the kinds with a cg term
  (:func:`needs_classifier`: cg, sag_cg, pag_cg, seg_cg, slg_cg).
* ``cg_form`` [cg]: ``"score"`` or ``"official"`` (guided-diffusion); None = ``model.cg_form``.
* ``pag_scale`` [pag]: s of eps_c + s (eps_c - eps_perturbed) (0 = off; diffusers' ``pag_scale``, default 3.0).
* ``pag_layers`` [pag]: self-attention layer patterns whose attention map is the identity in the perturbed pass
  (diffusers' ``pag_applied_layers="mid"`` of SD = ``mid_block.attentions.0.transformer_blocks.0.attn1``).
* ``seg_scale`` [seg]: SEG's s (0 = off; SEG-SDXL's ``seg_scale``). ``seg_layers`` [seg]: self-attention layer
  patterns whose queries are blurred. ``seg_blur_sigma`` [seg]: the blur's std in token cells, > 0; ``inf`` (or
  > 9999, as the reference) = infinite blur = uniform attention.
* ``slg_scale`` [slg]: s (0 = off; diffusers' ``skip_layer_guidance_scale`` with CFG, SD 3.5 Medium: 2.8).
  ``slg_layers`` [slg]: patterns over self-attention layers and transformer blocks to skip
  (:func:`sag.guidance.perturb.select_skippable`).
* ``apg_eta`` [apg]: weight of the update's part parallel to the conditional x0 (the paper recommends 0; 1 with no
  momentum and no threshold = CFG). ``apg_norm_threshold`` [apg]: r, the largest per-sample L2 norm of the update
  (0 = off). ``apg_momentum`` [apg]: beta of running = diff + beta running (0 = off; the paper uses negative values).
* ``start``, ``stop`` [sag/blur, pag, seg, slg]: the window of the kind's guidance term in fractions of the
  trajectory: iteration i of n is guided when start <= i / n < stop (stop = 1 includes the last); outside, the kind
  costs what it costs without that term. ``every`` [same]: k >= 1, guide only every k-th iteration of the window.
* ``cfg_start``, ``cfg_stop`` [cfg, apg]: the CFG (or APG) window (outside: the conditional call alone).
* ``cg_start``, ``cg_stop`` [cg]: the CG window (outside: the inner call alone).

Cost per guided step in network rows per image (counted by ``CallCounter``): none 1; cfg, apg 2; sag, blur, pag, seg,
slg 2; their ``*_cfg`` 3; cg adds a classifier gradient (``*_cg``: the inner kind's rows plus the gradient).
"""

from __future__ import annotations

import math

from sag.errors import SagConfigError
from sag.guidance.apg import AdaptiveProjectedGuidance
from sag.guidance.base import Guidance, ModelCall
from sag.guidance.cfg import ClassifierFreeGuidance
from sag.guidance.classifier import ClassifierGuidance
from sag.guidance.pag import PerturbedAttentionGuidance
from sag.guidance.sag import SelfAttentionGuidance
from sag.guidance.seg import SmoothedEnergyGuidance
from sag.guidance.slg import SkipLayerGuidance
from sag.models.base import DiffusionModel

# The guidance terms each kind is made of: "sag" (SAG, or blur guidance for kind blur), "pag", "seg", "slg",
# "cfg", "apg", "cg".
TERMS = {"none": (), "cfg": ("cfg",), "cg": ("cg",), "blur": ("sag",), "sag": ("sag",), "sag_cfg": ("sag", "cfg"),
         "sag_cg": ("sag", "cg"), "pag": ("pag",), "pag_cfg": ("pag", "cfg"), "seg": ("seg",),
         "seg_cfg": ("seg", "cfg"), "slg": ("slg",), "slg_cfg": ("slg", "cfg"), "apg": ("apg",),
         "pag_cg": ("pag", "cg"), "seg_cg": ("seg", "cg"), "slg_cg": ("slg", "cg")}
KINDS = tuple(TERMS)
# Kinds with a degraded (perturbed) pass: SAG / blur re-noise a degraded x0, PAG / SEG / SLG perturb the network.
PASS_KINDS = tuple(k for k, terms in TERMS.items() if terms and terms[0] in ("sag", "pag", "seg", "slg"))
PERTURBED = {"pag": PerturbedAttentionGuidance, "seg": SmoothedEnergyGuidance, "slg": SkipLayerGuidance}
# Each window with its options at their neutral values (the whole trajectory, every step), and the terms using it.
WINDOW_OPTIONS = {"sag": {"start": 0.0, "stop": 1.0, "every": 1}, "cfg": {"cfg_start": 0.0, "cfg_stop": 1.0},
                  "cg": {"cg_start": 0.0, "cg_stop": 1.0}}
WINDOW_TERMS = {"sag": ("sag", "pag", "seg", "slg"), "cfg": ("cfg", "apg"), "cg": ("cg",)}
TERM_NAMES = {"sag": "SAG/blur/PAG/SEG/SLG", "cfg": "CFG/APG", "cg": "classifier-guidance"}


def needs_classifier(kind: str) -> bool:
    """Whether guidance ``kind`` has a classifier-guidance term, so :func:`build_guidance` needs ``classifier``."""
    return "cg" in TERMS.get(kind, ())


def passes_of(guidance) -> dict:
    """The ``last_passes`` of the degraded-pass term in ``guidance`` (a :func:`build_guidance` result, or one
    wrapped by classifier guidance): ``{"x0", "x0_perturbed", "eps", "eps_perturbed"}`` of the last guided call, or
    ``{}`` when the current step ran no degraded pass (outside its window, every-k, scale 0). ``eps`` is the
    prediction in guidance space (the velocity for flow models, ``schedule.guidance_type``). A guidance without a
    degraded pass (none, cfg, cg, apg) is refused with :class:`SagConfigError`."""
    g = guidance
    while g is not None and not hasattr(g, "last_passes"):
        g = getattr(g, "inner", None)  # classifier guidance wraps the term; a plain model call ends the chain
    if g is None:
        raise SagConfigError(f"guidance {type(guidance).__name__} has no degraded pass to record; accepted: a kind "
                             f"in {list(PASS_KINDS)}")
    return g.last_passes


def refuse_foreign_windows(kind: str, options: dict) -> None:
    """A window option of a term that ``kind`` lacks must keep its neutral value, else :class:`SagConfigError`."""
    for window, neutral in WINDOW_OPTIONS.items():
        if set(WINDOW_TERMS[window]) & set(TERMS[kind]):
            continue
        for name, value in neutral.items():
            if options[name] != value:
                having = [k for k in KINDS if set(WINDOW_TERMS[window]) & set(TERMS[k])]
                raise SagConfigError(f"{name}={options[name]!r} sets the {TERM_NAMES[window]} window, which guidance "
                                     f"{kind!r} does not have; accepted: {value!r} (or a kind in {having})")


def build_guidance(model: DiffusionModel, kind: str = "sag", *, sag_scale: float = 0.75, layers="mid_block.*",
                   psi: float = 1.0, kernel_size: int = 9, blur_sigma: float = 1.0, cfg_scale: float = 3.0,
                   cg_scale: float = 1.0, classifier=None, start: float = 0.0, stop: float = 1.0, every: int = 1,
                   cfg_start: float = 0.0, cfg_stop: float = 1.0, cg_start: float = 0.0,
                   cg_stop: float = 1.0, map_heads: str | int = "layer", cg_form: str | None = None,
                   pag_scale: float = 3.0, pag_layers="mid_block.*", seg_scale: float = 3.0,
                   seg_layers="mid_block.*", seg_blur_sigma: float = math.inf, slg_scale: float = 2.8,
                   slg_layers="mid_block.*", apg_eta: float = 0.0, apg_norm_threshold: float = 0.0,
                   apg_momentum: float = 0.0) -> Guidance:
    """The model call of guidance ``kind``, always a :class:`Guidance` (``none``: a pass-through ModelCall).
    Every option, its term and its units: the module docstring of :mod:`sag.guidance.build`."""
    if kind not in KINDS:
        raise SagConfigError(f"guidance {kind!r}; accepted: {list(KINDS)}")
    refuse_foreign_windows(kind, {"start": start, "stop": stop, "every": every, "cfg_start": cfg_start,
                                  "cfg_stop": cfg_stop, "cg_start": cg_start, "cg_stop": cg_stop})
    terms = TERMS[kind]
    window = {"start": start, "stop": stop, "every": every}
    cfg = {"cfg_scale": cfg_scale if "cfg" in terms else 0.0, "cfg_start": cfg_start, "cfg_stop": cfg_stop}
    if kind == "none":
        return ModelCall(model)
    if kind == "cfg":
        return ClassifierFreeGuidance(model, cfg_scale, cfg_start, cfg_stop)
    if kind == "apg":
        return AdaptiveProjectedGuidance(model, cfg_scale, eta=apg_eta, norm_threshold=apg_norm_threshold,
                                         momentum=apg_momentum, start=cfg_start, stop=cfg_stop)
    if needs_classifier(kind) and classifier is None:
        raise SagConfigError(f"guidance {kind!r} needs a classifier; accepted: a noise-aware classifier(x_t, t)")
    if terms[0] in PERTURBED:
        own = {"pag": (pag_scale, pag_layers), "seg": (seg_scale, seg_layers), "slg": (slg_scale, slg_layers)}
        scale, patterns = own[terms[0]]
        extra = {"blur_sigma": seg_blur_sigma} if terms[0] == "seg" else {}
        inner = PERTURBED[terms[0]](model, scale=scale, layers=patterns, **extra, **window, **cfg)
    elif kind == "cg":
        inner = None
    else:
        inner = SelfAttentionGuidance(
            model, sag_scale, layers, psi, kernel_size, blur_sigma, mask="global" if kind == "blur" else "attention",
            map_heads=map_heads, **window, **cfg)
    if "cg" in terms:  # cg: around the model; sag_cg, pag_cg, seg_cg, slg_cg: around SAG / PAG / SEG / SLG
        return ClassifierGuidance(model, classifier, cg_scale, cg_start, cg_stop, inner=inner, form=cg_form)
    return inner
