"""Smoothed Energy Guidance (Hong 2024, arXiv 2408.00760) as a wrapper.

SEG perturbs the network, not the input: in an extra pass on the same (x_t, t, cond), the queries of the selected
self-attention layers are blurred by a 2-D Gaussian of std ``blur_sigma`` on the layer's token grid. Blurring the
queries is the paper's cheap equivalent of blurring the whole attention-weight matrix (its "query blurring");
sigma -> infinity replaces every query by the mean query, i.e. every query row gets the same (uniform-over-queries)
attention. The reference is the authors' code, SusungHong/SEG-SDXL ``pipeline_seg.py`` @ cf8256d:
``SEGCFGSelfAttnProcessor`` (finite sigma: ``gaussian_blur_2d`` with kernel ``ceil(6 sigma) + 1 - ceil(6 sigma) % 2``
clamped to the grid, reflect padding; ``blur_sigma > 9999``: ``query[:] = query.mean(tokens)``) and the combination
of its sampling loop::

    no CFG:  eps = eps_c + s (eps_c - eps_seg)
    CFG:     eps = eps_c + (g - 1)(eps_c - eps_u) + s (eps_c - eps_seg),   g = 1 + w (our ``cfg_scale`` is w)

i.e. ours = eps_u + (1 + w)(eps_c - eps_u) + s (eps_c - eps_seg), the perturbed pass on the conditional branch:
PAG's combination, so SEG is a :class:`sag.guidance.pag.PerturbedGuidance` (``family_functions.perturbed_*``).
diffusers' ``SmoothedEnergyGuidance`` guider (``hooks/smoothed_energy_guidance_utils.py::_gaussian_blur_2d``) runs
the mean for finite sigma and the blur for infinite sigma (the two branches swapped) and assumes a square grid; we
do not use its hook. What we reuse is diffusers' hook machinery (``diffusers.hooks.HookRegistry``/``ModelHook``):
a post-forward hook on each selected layer's ``to_q`` (the projection whose output is the query; the same place
diffusers hooks), installed for one model call by :func:`sag.guidance.perturb.perturb_modules`. The grid (h, w)
comes from the real hidden-state shape (:class:`sag.token_grid.GridTracker`), so non-square samples work; on a square
grid the blur is the authors' operation for operation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from diffusers.models.transformers.transformer_flux import FluxAttention
from torch import Tensor, nn

from sag.attention import select_layers
from sag.errors import SagConfigError
from sag.guidance.functions import gaussian_kernel1d
from sag.guidance.pag import PerturbedGuidance
from sag.guidance.perturb import perturb_modules
from sag.models.base import DiffusionModel
from sag.token_grid import GridTracker

# SEG-SDXL pipeline_seg.py, SEGCFGSelfAttnProcessor(inf_blur_threshold=9999.0): blur_sigma > 9999 is infinite blur.
INF_BLUR_THRESHOLD = 9999.0


def is_infinite_blur(blur_sigma: float) -> bool:
    """Whether ``blur_sigma`` means infinite blur (query = token mean): math.inf or > 9999, as the reference."""
    return blur_sigma > INF_BLUR_THRESHOLD


def seg_kernel_size(blur_sigma: float) -> int:
    """The reference's odd kernel size for a finite ``blur_sigma`` (token cells): ceil(6 sigma), made odd upwards
    (``pipeline_seg.py``: ``math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2``), before clamping to the grid."""
    k = math.ceil(6 * blur_sigma)
    return k + 1 - k % 2


def _clamped(kernel_size: int, side: int) -> int:
    """``gaussian_blur_2d``'s clamp: at most the side (odd side) or side + 1 (even side), so reflect padding fits."""
    return min(kernel_size, side - (side % 2 - 1))


def smooth_queries(query: Tensor, grid: tuple[int, int], blur_sigma: float) -> Tensor:
    """SEG's query blurring: ``query`` (b, T, C) (the ``to_q`` output, channel = head * head_dim + i) seen as a
    (b, C, h, w) image on the token grid ``grid`` (row-major, T = h w), blurred per channel by a 2-D Gaussian of
    std ``blur_sigma`` token cells with reflect padding; infinite ``blur_sigma`` (:func:`is_infinite_blur`) replaces
    every query by the mean over tokens. Returns a new (b, T, C) tensor; the input is not modified.

    Finite sigma follows SEG-SDXL ``gaussian_blur_2d``: kernel :func:`seg_kernel_size`, clamped to each side of the
    grid (the reference clamps both to the width, the same on its square grids), outer product of two normalised
    1-D Gaussians (:func:`sag.guidance.functions.gaussian_kernel1d`, the same pdf), one grouped ``conv2d``.
    """
    b, tokens, c = query.shape
    h, w = grid
    if h * w != tokens:
        raise ValueError(f"grid {h}x{w} does not hold the {tokens} query tokens")
    q = query.transpose(1, 2).reshape(b, c, h, w)
    if is_infinite_blur(blur_sigma):
        q = q.mean(dim=(-2, -1), keepdim=True).expand(b, c, h, w)
    else:
        k = seg_kernel_size(blur_sigma)
        kh, kw = _clamped(k, h), _clamped(k, w)
        gh = gaussian_kernel1d(kh, blur_sigma, q.dtype, q.device)
        gw = gaussian_kernel1d(kw, blur_sigma, q.dtype, q.device)
        kernel2d = torch.mm(gh[:, None], gw[None, :]).expand(c, 1, kh, kw)
        q = F.pad(q, [kw // 2, kw // 2, kh // 2, kh // 2], mode="reflect")
        q = F.conv2d(q, kernel2d, groups=c)
    return q.reshape(b, c, tokens).transpose(1, 2).contiguous()


class QueryBlurHook(ModelHook):
    """A diffusers ``ModelHook`` for a layer's ``to_q``: its output (b, T, C) goes through :func:`smooth_queries`
    on the grid ``tracker`` resolves for ``key`` (the ``<layer>.to_q`` name)."""

    def __init__(self, key: str, tracker: GridTracker, blur_sigma: float):
        super().__init__()
        self.key, self.tracker, self.blur_sigma = key, tracker, blur_sigma

    def post_forward(self, module: nn.Module, output: Tensor) -> Tensor:
        return smooth_queries(output, self.tracker.resolve(self.key, output.shape[1]), self.blur_sigma)


def _query_blur_hook(key: str, tracker: GridTracker, blur_sigma: float, module: nn.Module) -> QueryBlurHook:
    return QueryBlurHook(key, tracker, blur_sigma)


def check_query_layers(net: nn.Module, names: Iterable[str]) -> None:
    """Refuse (:class:`SagConfigError`) a layer whose query is not a separate ``to_q`` Linear (fused qkv), or whose
    ``to_q`` sees text tokens too: a Flux single-stream ``FluxAttention`` (no ``add_q_proj``; its ``to_q`` input is
    [text; image], ``FluxSingleTransformerBlock``), which has no image token grid to blur on. A joint layer (SD3's
    ``Attention``, Flux's ``transformer_blocks.N.attn``) projects text by ``add_q_proj``: its ``to_q`` sees the image
    tokens only, blurred on the (packed) latent grid."""
    for n in names:
        m = net.get_submodule(n)
        if getattr(m, "fused_projections", False) or not isinstance(getattr(m, "to_q", None), nn.Linear):
            raise SagConfigError(f"SEG blurs the output of layer {n!r}'s to_q projection, which it does not have "
                                 "(fused qkv); accepted: attention layers with a separate to_q Linear")
        if isinstance(m, FluxAttention) and m.added_kv_proj_dim is None:
            raise SagConfigError(f"SEG layer {n!r} is a single-stream FluxAttention whose to_q sees text and image "
                                 "tokens together (no image grid); accepted: joint layers (transformer_blocks.N.attn)")


@contextmanager
def smoothed_queries(net: nn.Module, layers: Iterable[str], blur_sigma: float) -> Iterator[None]:
    """While the block runs, the queries of the attention layers ``layers`` (fully qualified names) are blurred
    (:func:`smooth_queries`): a :class:`QueryBlurHook` on each layer's ``to_q``, installed and always removed by
    :func:`sag.guidance.perturb.perturb_modules` (diffusers' ``HookRegistry``; modules left exactly as found)."""
    names = list(layers)
    check_query_layers(net, names)
    keys = [f"{n}.to_q" for n in names]
    tracker = GridTracker(net, keys)  # a layer's own 4-D input, else the nearest enclosing (B, C, H, W) input
    try:
        with perturb_modules(net, {k: partial(_query_blur_hook, k, tracker, blur_sigma) for k in keys}):
            yield
    finally:
        tracker.remove()


class SmoothedEnergyGuidance(PerturbedGuidance):
    """SEG, optionally with CFG: a :class:`sag.guidance.pag.PerturbedGuidance` whose perturbed pass (the
    conditional branch, one extra call) blurs the queries of ``layers`` (:func:`smoothed_queries`).

    ``scale`` is SEG's s (SEG-SDXL ``seg_scale``, 0 = off; its default there 3.0). ``layers`` are self-attention
    name patterns (:func:`sag.attention.select_layers`; SEG-SDXL's default is the mid block). ``blur_sigma`` is the
    Gaussian's std in token cells of each layer's grid, > 0; ``math.inf`` (or > 9999, as the reference) is infinite
    blur (uniform attention), SEG-SDXL's default (9999999); its README steps sigma exponentially (1, 4, 16, ...).
    ``cfg_scale`` is w of CFG (0 = no CFG; diffusers' and SEG-SDXL's ``guidance_scale`` g = 1 + w) with its own
    ``cfg_start``/``cfg_stop`` window; ``start``/``stop``/``every`` are the SEG window (outside: one plain or CFG
    call). Learned variance comes from the conditional branch. After each guided call, ``last_passes`` holds
    ``{"x0", "x0_perturbed", "eps", "eps_perturbed"}`` of the conditional and the perturbed pass (x0 clipped for pixel
    models; (b, C, H, W) each), so attention studies can look at what SEG perturbs.
    """

    what = "seg"

    def __init__(self, model: DiffusionModel, scale: float = 3.0, layers="mid_block.*", blur_sigma: float = math.inf,
                 start: float = 0.0, stop: float = 1.0, every: int = 1, cfg_scale: float = 0.0,
                 cfg_start: float = 0.0, cfg_stop: float = 1.0, inner=None):
        super().__init__(model, scale, start, stop, every, cfg_scale, cfg_start, cfg_stop, inner)
        sigma = float(blur_sigma)
        if math.isnan(sigma) or sigma <= 0:
            raise SagConfigError(f"blur_sigma={blur_sigma}; accepted: blur_sigma > 0 (inf or > {INF_BLUR_THRESHOLD:g}"
                                 " = infinite blur)")
        self.blur_sigma = sigma
        self.layers = select_layers(model.net, layers)
        check_query_layers(model.net, self.layers)

    def perturbation(self) -> AbstractContextManager:
        """Blurred queries on the chosen layers (:func:`smoothed_queries`)."""
        return smoothed_queries(self.model.net, self.layers, self.blur_sigma)
