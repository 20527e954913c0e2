"""Perturbed-Attention Guidance (Ahn et al. 2024, arXiv 2403.17377) and the base of every guidance that perturbs
the network in an extra pass (:class:`PerturbedGuidance`; SLG in :mod:`sag.guidance.slg`).

Per guided step:
1. one model call on x_t with the sample's condition (batched with the unconditional branch under CFG, one 2B
   call, as diffusers): eps_c (and eps_u);
2. a second call on the same x_t and condition with the network perturbed for that call only (PAG: the
   self-attention map of the chosen layers replaced by the identity, :func:`sag.guidance.perturb.identity_attention`):
   eps_perturbed;
3. eps~ = eps_c + s (eps_c - eps_perturbed), with CFG eps_u + (1 + w)(eps_c - eps_u) + s (eps_c - eps_perturbed)
   (:mod:`sag.guidance.family_functions`; diffusers' ``StableDiffusionPAGPipeline`` with guidance_scale = 1 + w,
   pag_scale = s).
Guidance math happens in eps space (``to_eps``/``from_eps``), so every prediction type works; learned variance
comes from the conditional branch. Outside the window (``start``/``stop``/``every``) a step costs one plain call
(CFG: one 2B call, in its own ``cfg_start``/``cfg_stop`` window). Cost of a guided step: B + B rows (3B with CFG).

The last guided call's two passes are kept on ``last_passes`` (``{"x0", "x0_perturbed", "eps", "eps_perturbed"}``:
the x0 estimates of the conditional and the perturbed prediction, clipped as the sampler's x0 for pixel models, and
the two predictions in guidance space, (b, C, H, W) each), so a study can see what the degraded prediction looked
like; it is emptied by ``begin_step``, so a step that runs no perturbed pass (outside the window, every-k, s = 0)
leaves it ``{}`` (the capture stage records it: :func:`sag.stages.capture_run` ``passes``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from torch import Tensor

from sag.attention import select_layers
from sag.guidance.base import Guidance, LazyPasses, Window, batch_t, check_scale
from sag.guidance.cfg import ClassifierFreeGuidance, uncond_cond_batch
from sag.guidance.family_functions import perturbed_cfg_combine, perturbed_combine
from sag.guidance.perturb import check_identity_attention, identity_attention
from sag.models.base import DiffusionModel


class PerturbedGuidance(Guidance):
    """A guidance whose degraded prediction is the same model call under a network perturbation
    (:meth:`perturbation`, a context manager installed for that one call). ``scale`` = s (0 = off); ``cfg_scale``
    = w (0 = no CFG) with its own ``cfg_start``/``cfg_stop`` window; ``start``/``stop``/``every``: the
    perturbation term's :class:`Window`, meaning what they mean for SAG."""

    what = "perturbed guidance"

    def __init__(self, model: DiffusionModel, scale: float, start: float = 0.0, stop: float = 1.0, every: int = 1,
                 cfg_scale: float = 0.0, cfg_start: float = 0.0, cfg_stop: float = 1.0, inner=None):
        super().__init__(model, inner, start, stop, every)
        self.scale = check_scale(f"{self.what} scale", scale)
        self.cfg_scale = check_scale("cfg scale", cfg_scale)
        self.cfg_window = Window(cfg_start, cfg_stop)
        # CFG alone (steps outside the perturbation window): the CFG wrapper on the same inner call
        self._cfg = ClassifierFreeGuidance(model, self.cfg_scale, inner=self.inner) if self.cfg_scale != 0 else None
        self.last_passes: dict[str, Tensor] = {}

    def perturbation(self) -> AbstractContextManager:
        """The network perturbation of the degraded pass, installed for one call."""
        raise NotImplementedError

    def begin_step(self, step: int, num_steps: int) -> None:
        """Update the perturbation window, the CFG window, then the inner call's."""
        super().begin_step(step, num_steps)
        self.cfg_window.update(step, num_steps)
        self.last_passes = {}  # filled again only by a call that runs the perturbed pass

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        use_cfg = self._cfg is not None and self.cfg_window.active
        t = batch_t(t, x)
        if not (self.window.active and self.scale != 0):
            return self._cfg(x, t, cond) if use_cfg else self.inner(x, t, cond)
        b = x.shape[0]
        # 1. the plain pass (with the unconditional branch under CFG: one 2B call)
        xx, tt, cc = uncond_cond_batch(self.model, x, t, cond) if use_cfg else (x, t, cond)
        eps, var = self.to_eps(self.inner(xx, tt, cc), xx, tt)
        eps_c = eps[b:] if use_cfg else eps
        # 2. the perturbed pass: same input and condition, network perturbed for this call only
        with self.perturbation():
            eps_ptb, _ = self.to_eps(self.inner(x, t, cond), x, t)
        self.last_passes = LazyPasses(x0=lambda: self.x0(eps_c, x, t), x0_perturbed=lambda: self.x0(eps_ptb, x, t),
                                      eps=eps_c, eps_perturbed=eps_ptb)
        # 3. combine
        if use_cfg:
            guided = perturbed_cfg_combine(eps[:b], eps_c, eps_ptb, self.cfg_scale, self.scale)
            var = None if var is None else var[b:]
        else:
            guided = perturbed_combine(eps_c, eps_ptb, self.scale)
        return self.from_eps(guided, x, t, var)


class PerturbedAttentionGuidance(PerturbedGuidance):
    """PAG: the degraded pass replaces the self-attention map of ``layers`` (name patterns, as SAG's: glob or
    ``re:``; several give their union) by the identity, so those layers output their value projection (diffusers'
    ``PAGIdentitySelfAttnProcessor2_0`` perturbed path, installed with diffusers' layer-skip hook). ``scale`` = s
    = diffusers' ``pag_scale``; ``cfg_scale`` = w = diffusers' ``guidance_scale`` - 1. Diffusers' "mid" layer of
    SD is ``mid_block.attentions.0.transformer_blocks.0.attn1`` here (fully qualified names)."""

    what = "pag"

    def __init__(self, model: DiffusionModel, scale: float = 3.0, layers="mid_block.*", start: float = 0.0,
                 stop: float = 1.0, every: int = 1, cfg_scale: float = 0.0, cfg_start: float = 0.0,
                 cfg_stop: float = 1.0, inner=None):
        super().__init__(model, scale, start, stop, every, cfg_scale, cfg_start, cfg_stop, inner)
        self.layers = select_layers(model.net, layers)
        check_identity_attention(model.net, self.layers)

    def perturbation(self) -> AbstractContextManager:
        """Identity self-attention on the chosen layers (:func:`sag.guidance.perturb.identity_attention`)."""
        return identity_attention(self.model.net, self.layers)
