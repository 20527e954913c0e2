"""Self-Attention Guidance (Hong et al. 2023) and its global variant, blur guidance, as a wrapper.

Per guided step (paper Sec. 4, official ``p_sample``/``ddim_sample``):
1. one model call on x_t (batched with the unconditional branch under CFG) while the selected
   self-attention layers are captured: eps(x_t) and the received-attention map A_t;
2. M_t = nearest-upsampled [received(A_t) > psi] (union over the selected layers; all ones for blur
   guidance);
3. x0 estimate from eps(x_t) (clipped for pixel models, as ADM's clip_denoised);
4. x_bar_t = sqrt(ab) [(1 - M) x0 + M G(x0)] + sqrt(1 - ab) eps(x_t), G a Gaussian blur of std ``blur_sigma``
   (same t, same noise);
5. a second model call on x_bar_t (unconditional under CFG);
6. eps~ = eps + s (eps - eps(x_bar_t))  (Eq. 16), or with CFG Eq. 25.
Learned variance is taken from the first pass. Outside the window a step costs one model call. ``t`` may be a
scalar or a (b,) tensor. After a guided call ``last_passes`` holds ``{"x0", "x0_perturbed", "eps", "eps_perturbed"}``:
the x0 and eps of the first pass (the unconditional branch under CFG) and of the degraded pass on x_bar_t (as
:class:`sag.guidance.pag.PerturbedGuidance`; ``{}`` after ``begin_step`` of a step that runs no degraded pass).

``map_heads`` chooses the heads of the map in step 1: ``"layer"`` (default) the layer's own heads;
``"official"`` the official code's grouping (:func:`resolve_map_heads`).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from sag.attention import select_layers
from sag.capture import AttentionStore, capture_attention, check_map_heads
from sag.errors import SagConfigError, SagConfigWarning
from sag.guidance.base import Guidance, LazyPasses, Window, batch_t, check_scale
from sag.guidance.cfg import require_cond, uncond_cond_batch
from sag.guidance.functions import attention_mask, cfg_combine, degrade, sag_cfg_combine, sag_combine, union_masks
from sag.models.base import DiffusionModel

MASKS = ("attention", "global")


def warn_noop_settings(scale: float, kernel_size: int) -> None:
    """One-line :class:`SagConfigWarning`s for settings SAG / blur guidance runs but cannot use as named: a negative
    scale s (anti-guidance: Eq. 16 with s < 0 moves eps towards eps(x_bar_t), the blurred input's prediction;
    allowed, as a deliberate ablation) and ``kernel_size=1`` (the Gaussian blur is the identity, x_bar_t = x_t up
    to rounding, so eps(x_bar_t) = eps(x_t) and every guided step costs a second model call for nothing)."""
    if scale < 0:
        warnings.warn(f"sag_scale={scale} < 0 is anti-guidance (eps - |s| (eps - eps(x_bar))); accepted as is, "
                      "0 turns SAG off, s > 0 guides", SagConfigWarning, stacklevel=3)
    if kernel_size == 1:
        warnings.warn("kernel_size=1 makes the blur the identity, so SAG / blur guidance is a no-op that still costs "
                      "a model call per step; accepted: an odd kernel_size >= 3", SagConfigWarning, stacklevel=3)
MAP_HEADS = ("layer", "official")  # or a positive integer: the official grouping with that many pseudo-heads


def resolve_map_heads(model: DiffusionModel, map_heads: str | int) -> tuple[int | None, str]:
    """(pseudo-head count or None, qkv layout) for :func:`sag.capture.capture_attention` from SAG's ``map_heads``.

    ``"layer"``: None, the selected layer's own heads (diffusers' SAG pipeline, and ours by default).
    ``"official"``: the official SAG code's map (KU-CVLAB/Self-Attention-Guidance ``guided_diffusion/unet.py``
    ``attention_from_qkv(qkv, self.num_heads)``, thresholded in ``gaussian_diffusion.py::attention_masking`` with
    ``reshape(B, self.num_heads, ...)``): the layer's qkv regrouped into the MODEL-level ``num_heads`` flag's
    pseudo-heads (:func:`sag.capture.regrouped_probs`). It differs from the layer's heads where the layer was
    built with ``num_head_channels`` (ADM 256-px ImageNet and LSUN: 16 true heads at 8x8, 4 pseudo-heads), so
    it is the map behind the paper's FID numbers there; for ImageNet-128 (``num_heads=4`` everywhere) both agree
    up to float rounding. Needs the model's guided-diffusion flags (``model.adm_flags``). An integer n: that
    regrouping with n pseudo-heads on any model (layout from ``model.adm_flags`` when present, else legacy).
    The network's output is unchanged (the layer still attends with its own heads); only the mask M_t changes.
    """
    flags = getattr(model, "adm_flags", None) or {}
    layout = "new" if flags.get("use_new_attention_order") else "legacy"
    if map_heads == "layer":
        return None, layout
    if map_heads == "official":
        if "num_heads" not in flags:
            raise SagConfigError(f"map_heads='official' needs the guided-diffusion num_heads flag, which model "
                                 f"{model.name!r} does not record; accepted: 'layer' or an integer head count")
        return int(flags["num_heads"]), layout
    if isinstance(map_heads, int) and not isinstance(map_heads, bool) and map_heads >= 1:
        return map_heads, layout
    raise SagConfigError(f"map_heads={map_heads!r}; accepted: {list(MAP_HEADS)} or a positive integer")


class SelfAttentionGuidance(Guidance):
    """SAG (``mask="attention"``) or blur guidance (``mask="global"``), optionally with CFG (Eq. 25).

    ``scale`` is the paper's s (0 = off; the official code's flag is 1 + s). ``layers`` are name patterns
    (see :mod:`sag.attention`); several layers give the union of their masks. ``cfg_scale`` is w of
    classifier-free guidance (0 = no CFG), with its own ``cfg_start``/``cfg_stop`` window. ``start``/``stop``/
    ``every`` are the SAG window: ``every = k`` guides every k-th step of it only (the others: one plain or CFG
    call); CFG keeps its own window. ``kernel_size`` (odd) and ``blur_sigma`` (std) are in pixels or latent cells.
    ``map_heads`` (``"layer"``, ``"official"`` or an integer; see :func:`resolve_map_heads`) sets the heads whose
    mean received attention makes the mask; blur guidance ignores it.
    """

    def __init__(self, model: DiffusionModel, scale: float = 0.75, layers="mid_block.*", psi: float = 1.0,
                 kernel_size: int = 9, blur_sigma: float = 1.0, mask: str = "attention", cfg_scale: float = 0.0,
                 start: float = 0.0, stop: float = 1.0, cfg_start: float = 0.0, cfg_stop: float = 1.0,
                 inner=None, every: int = 1, map_heads: str | int = "layer"):
        super().__init__(model, inner, start, stop, every)
        self.scale = check_scale("sag scale", scale)
        self.cfg_scale = check_scale("cfg scale", cfg_scale)
        self.psi = check_scale("psi", psi)
        self.blur_sigma = check_scale("blur_sigma", blur_sigma)
        if mask not in MASKS:
            raise SagConfigError(f"mask={mask!r}; accepted: {list(MASKS)}")
        if self.psi <= 0:
            raise SagConfigError(f"psi={psi}; accepted: psi > 0 (1.0 = above-mean received attention)")
        if self.blur_sigma <= 0:
            raise SagConfigError(f"blur_sigma={blur_sigma}; accepted: blur_sigma > 0")
        if isinstance(kernel_size, bool) or int(kernel_size) != kernel_size or kernel_size < 1 or kernel_size % 2 == 0:
            raise SagConfigError(f"kernel_size={kernel_size}; accepted: an odd positive integer")
        self.kernel_size = int(kernel_size)
        self.mask = mask
        self._warned_psi = False
        warn_noop_settings(self.scale, self.kernel_size)
        self.layers = select_layers(model.net, layers, cross_key=None) if mask == "attention" else []
        self.map_heads, self.qkv_layout = resolve_map_heads(model, map_heads) if self.layers else (None, "legacy")
        check_map_heads(model.net, self.layers, self.map_heads)
        if self.cfg_scale != 0:
            require_cond(model, "SAG with classifier-free guidance")
        self.cfg_window = Window(cfg_start, cfg_stop)
        self.store = AttentionStore()
        self.last_passes: dict[str, Tensor] = {}

    def begin_step(self, step: int, num_steps: int) -> None:
        """Update the SAG window, the CFG window, then the inner call's."""
        super().begin_step(step, num_steps)
        self.cfg_window.update(step, num_steps)
        self.last_passes = {}  # filled again only by a call that runs the degraded pass

    def validate(self, size: tuple[int, int]) -> None:
        """Refuse a blur kernel larger than the sample's smaller side (H, W); then the inner call's checks."""
        super().validate(size)
        if self.kernel_size > min(size):
            raise SagConfigError(f"kernel_size={self.kernel_size} is larger than the {size[0]}x{size[1]} "
                                 "sample; accepted: an odd size <= the smaller side")

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        use_cfg = self.cfg_scale != 0 and self.cfg_window.active
        t = batch_t(t, x)
        if not (self.window.active and self.scale != 0):
            return self._cfg_only(x, t, cond) if use_cfg else self.inner(x, t, cond)
        b = x.shape[0]
        xx, tt, cc = uncond_cond_batch(self.model, x, t, cond) if use_cfg else (x, t, cond)
        # 1. first pass, capturing attention of the selected layers
        if self.mask == "attention":
            # rows=b: under CFG only the unconditional half's map is used (Eq. 25), the rest is not computed;
            # lse_maps off (explicit softmax): masks (received > psi) bit-identical to earlier runs; exact off: the
            # recorded images' layer output is probs @ v of that softmax, one attention per image (as diffusers'
            # pipeline and the official code compute it), not SDPA's as well
            with capture_attention(self.model.net, self.layers, ["received"], store=self.store, rows=b,
                                   map_heads=self.map_heads, qkv_layout=self.qkv_layout, lse_maps=False,
                                   exact=False):
                out = self.inner(xx, tt, cc)
            records = [r for r in self.store.pop() if r.call == 0]
            self._warn_empty_mask(records)
        else:
            out, records = self.inner(xx, tt, cc), []
        eps, var = self.to_eps(out, xx, tt)
        eps_u = eps[:b]  # the unconditional branch under CFG: it supplies x0, the map and the noise (Eq. 25)
        # 2. mask
        size = tuple(x.shape[-2:])
        if records:
            mask = union_masks([attention_mask(r.data["received"][:b], self.psi, size) for r in records])
            mask = mask.to(x.dtype)
        else:
            mask = torch.ones(b, 1, *size, dtype=x.dtype, device=x.device)
        # 3-4. degraded input
        sched = self.model.schedule  # the noise of x_t is eps itself in VP guidance space, from v for flow models
        noise = eps_u if sched.guidance_type == "epsilon" else sched.to_eps(eps_u, x, t, sched.guidance_type)
        x0 = self.x0(eps_u, x, t)
        x_bar = degrade(x0, noise, mask, t, sched, self.kernel_size, self.blur_sigma)
        # 5. second pass (unconditional under CFG, else the same condition)
        deg_cond = cc[:b] if use_cfg else cond
        eps_deg, _ = self.to_eps(self.inner(x_bar, t, deg_cond), x_bar, t)
        self.last_passes = LazyPasses(x0=x0, x0_perturbed=lambda: self.x0(eps_deg, x_bar, t), eps=eps_u,
                                      eps_perturbed=eps_deg)
        # 6. combine
        if use_cfg:
            guided = sag_cfg_combine(eps_u, eps[b:], eps_deg, self.cfg_scale, self.scale)
            var = None if var is None else var[b:]
        else:
            guided = sag_combine(eps_u, eps_deg, self.scale)
        return self.from_eps(guided, x, t, var)

    def _warn_empty_mask(self, records) -> None:
        """Warn once when psi is at or above every captured layer's token count N: the received mass of a key is at
        most N (every query's whole row on it), so ``received > psi`` never holds and SAG does nothing."""
        if self._warned_psi or not records:
            return
        self._warned_psi = True
        most = max(r.data["received"][0].numel() for r in records)
        if self.psi >= most:
            warnings.warn(f"psi={self.psi} >= {most}, the most attention a key can receive from the layers' {most} "
                          "queries: the SAG mask is always empty and guidance a no-op; accepted: psi < token count "
                          "(1.0 = above-mean attention)", SagConfigWarning, stacklevel=3)

    def _cfg_only(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        b = x.shape[0]
        xx, tt, cc = uncond_cond_batch(self.model, x, t, cond)
        eps, var = self.to_eps(self.inner(xx, tt, cc), xx, tt)
        return self.from_eps(cfg_combine(eps[:b], eps[b:], self.cfg_scale), x, t, None if var is None else var[b:])
