"""``build_guidance``: one named guidance kind (``conf/guidance/*.yaml``) from flat options, one rule for them all."""

from __future__ import annotations

from sag.errors import SagConfigError
from sag.guidance.base import Guidance, ModelCall
from sag.guidance.cfg import ClassifierFreeGuidance
from sag.guidance.classifier import ClassifierGuidance
from sag.guidance.sag import SelfAttentionGuidance
from sag.models.base import DiffusionModel

KINDS = ("none", "cfg", "cg", "blur", "sag", "sag_cfg", "sag_cg")
# The guidance terms each kind is made of: "sag" (SAG, or blur guidance for kind blur), "cfg", "cg".
TERMS = {"none": (), "cfg": ("cfg",), "cg": ("cg",), "blur": ("sag",), "sag": ("sag",), "sag_cfg": ("sag", "cfg"),
         "sag_cg": ("sag", "cg")}
# Each term's window options with their neutral values (the whole trajectory, every step).
TERM_NAMES = {"sag": "SAG/blur", "cfg": "CFG", "cg": "classifier-guidance"}
WINDOW_OPTIONS = {"sag": {"start": 0.0, "stop": 1.0, "every": 1}, "cfg": {"cfg_start": 0.0, "cfg_stop": 1.0},
                  "cg": {"cg_start": 0.0, "cg_stop": 1.0}}


def refuse_foreign_windows(kind: str, options: dict) -> None:
    """A window option of a term that ``kind`` lacks must keep its neutral value, else :class:`SagConfigError`."""
    for term, neutral in WINDOW_OPTIONS.items():
        if term in TERMS[kind]:
            continue
        for name, value in neutral.items():
            if options[name] != value:
                having = [k for k in KINDS if term in TERMS[k]]
                raise SagConfigError(f"{name}={options[name]!r} sets the {TERM_NAMES[term]} window, which guidance "
                                     f"{kind!r} does not have; accepted: {value!r} (or a kind in {having})")


def build_guidance(model: DiffusionModel, kind: str = "sag", *, sag_scale: float = 0.75, layers="mid_block.*",
                   psi: float = 1.0, kernel_size: int = 9, blur_sigma: float = 1.0, cfg_scale: float = 3.0,
                   cg_scale: float = 1.0, classifier=None, start: float = 0.0, stop: float = 1.0, every: int = 1,
                   cfg_start: float = 0.0, cfg_stop: float = 1.0, cg_start: float = 0.0,
                   cg_stop: float = 1.0, map_heads: str | int = "layer", cg_form: str | None = None) -> Guidance:
    """The model call of guidance ``kind``, always a :class:`Guidance` (``none``: a pass-through ModelCall).

    Kinds and their terms: ``none``; ``cfg`` (classifier-free guidance); ``cg`` (classifier guidance);
    ``sag`` (paper Eq. 16); ``blur`` (SAG's degradation with a mask of ones); ``sag_cfg`` (Eq. 25: SAG built on
    the unconditional branch + CFG); ``sag_cg`` (classifier guidance around SAG).

    One rule: every option belongs to one term and means the same in every kind that has the term. A *window*
    option of a term the kind lacks is refused (:class:`SagConfigError`) unless left at its neutral value; the
    *settings* of a term the kind lacks (scales, layers, psi, blur) are ignored, so that one
    ``conf/model_guidance/<model>.yaml`` serves every kind. The windows are fixed here: callers do not replace
    ``.window`` or ``.inner`` afterwards (count calls with ``CallCounter(model.net)``).

    Args:
        model: the ``DiffusionModel`` (schedule, prediction type, conditioning, network for the layers).
        kind: one of ``KINDS``.
        sag_scale: s of Eq. 16 / 25 (0 = off; the official code's ``--guide_scale`` flag is 1 + s). SAG/blur term.
        layers: self-attention layer name patterns (glob or ``re:``; several give the union of their masks) whose
            received attention makes SAG's mask M_t. sag, sag_cfg, sag_cg (blur's mask is all ones).
        psi: mask threshold on received attention, > 0 (mean over keys = 1; 1.0 = above-mean keys, the
            official code's ``> 1.0``). SAG term.
        kernel_size: odd size of the Gaussian blur of the x0 estimate, <= the sample's smaller side (pixels, or
            latent cells for latent models). SAG/blur term.
        blur_sigma: standard deviation of that blur (same units), > 0. SAG/blur term.
        cfg_scale: w of eps_u + (1 + w)(eps_c - eps_u) (0 = conditional only; diffusers' ``guidance_scale`` is
            1 + w). cfg, sag_cfg.
        cg_scale: lambda, the gradient's scale (0 = off; the official ``--classifier_scale``). cg, sag_cg.
        classifier: noise-aware ``classifier(x_t, t) -> logits``; required by cg, sag_cg.
        cg_form: ``"score"`` (on the raw eps) or ``"official"`` (guided-diffusion: x0 clipped, then condition_mean
            on DDPM / condition_score); None = ``model.cg_form`` (ADM: official, else score). cg, sag_cg.
        start, stop: the SAG/blur term's window in fractions of the trajectory: iteration i of n is guided when
            start <= i / n < stop (stop = 1 includes the last); outside, the kind costs what it costs without SAG.
        every: k >= 1, guide only every k-th iteration of the SAG/blur window, counted from its first.
        cfg_start, cfg_stop: the CFG term's window (outside: the conditional call alone). cfg, sag_cfg.
        cg_start, cg_stop: the CG term's window (outside: the inner call alone). cg, sag_cg.
        map_heads: heads of the mask's map: ``"layer"`` (the layer's own), ``"official"`` (the official code's
            ADM ``num_heads`` grouping, for the paper's ADM-256/LSUN FIDs) or n; ``resolve_map_heads``. SAG term.
    """
    if kind not in KINDS:
        raise SagConfigError(f"guidance {kind!r}; accepted: {list(KINDS)}")
    refuse_foreign_windows(kind, {"start": start, "stop": stop, "every": every, "cfg_start": cfg_start,
                                  "cfg_stop": cfg_stop, "cg_start": cg_start, "cg_stop": cg_stop})
    if kind == "none":
        return ModelCall(model)
    if kind == "cfg":
        return ClassifierFreeGuidance(model, cfg_scale, cfg_start, cfg_stop)
    if "cg" in TERMS[kind] and classifier is None:
        raise SagConfigError(f"guidance {kind!r} needs a classifier")
    sag = None if kind == "cg" else SelfAttentionGuidance(
        model, sag_scale, layers, psi, kernel_size, blur_sigma, mask="global" if kind == "blur" else "attention",
        cfg_scale=cfg_scale if kind == "sag_cfg" else 0.0, start=start, stop=stop, cfg_start=cfg_start,
        cfg_stop=cfg_stop, every=every, map_heads=map_heads,
    )
    if "cg" in TERMS[kind]:  # cg: around the model; sag_cg: around SAG
        return ClassifierGuidance(model, classifier, cg_scale, cg_start, cg_stop, inner=sag, form=cg_form)
    return sag
