"""Network perturbations for one model call: diffusers hooks installed in a ``with`` block that always restores.

PAG, SEG and SLG degrade the *network* (not its input) in an extra pass. Each perturbation is a diffusers
``ModelHook`` (``diffusers/hooks/hooks.py``) registered on the chosen modules by fully qualified name through
diffusers' ``HookRegistry``, and removed in ``finally`` -- also on an exception -- leaving each module exactly
as it was (its ``forward`` and, where we created it, its ``_diffusers_hook`` registry attribute). What is reused
from diffusers (``diffusers/hooks/layer_skip.py``, the hooks its PAG / SLG guiders install):

* :func:`identity_attention` (PAG): ``AttentionProcessorSkipHook(skip_attention_scores=True)``, diffusers'
  ``LayerSkipConfig(skip_attention=False, skip_attention_scores=True)`` as its ``PerturbedAttentionGuidance``
  guider sets it. Under the hook, ``F.scaled_dot_product_attention`` of the layer returns its ``value``
  (identity attention map), so the layer outputs ``to_out(to_v(h))`` -- the perturbed path of
  ``PAGIdentitySelfAttnProcessor2_0`` (Ahn et al. 2024). It needs a processor that calls SDPA
  (``AttnProcessor2_0``); any other is refused, since the identity would then silently not apply.
* :func:`skip_layers` (SLG): a transformer block gets :class:`BlockSkipHook` (diffusers' ``TransformerBlockSkipHook``
  with the outputs in the block's own order: block output = its ``hidden_states`` and, for a two-stream block,
  ``encoder_hidden_states`` inputs); an attention module gets ``AttentionProcessorSkipHook`` with diffusers' registered
  ``skip_processor_output_fn`` (output = the module's ``hidden_states`` input; for a residual attention block of a
  pixel UNet that removes the block, for ``attn1`` of a pre-norm transformer block the residual then adds the
  normed input instead of the attention: diffusers' ``skip_attention`` semantics).
* :func:`perturb_modules` installs any ``ModelHook`` (e.g. diffusers' ``SmoothedEnergyGuidanceHook`` for SEG).

Under attention capture (:func:`sag.capture.capture_attention`, e.g. the capture stage with ``guidance=pag``) a
perturbed layer runs a recording processor, which neither calls SDPA as PAG's hook needs nor is registered for
SLG's skip; :func:`unrecorded` gives it back diffusers' ``AttnProcessor2_0`` (what capture replaced) for the
perturbed pass only, so that layer is not recorded in that pass (under PAG its map is the identity by
construction, under SLG it is skipped) and every other captured layer is.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks._helpers import AttentionProcessorRegistry, TransformerBlockRegistry
from diffusers.hooks.layer_skip import AttentionProcessorSkipHook, TransformerBlockSkipHook
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from sag.attention import _matches
from sag.capture import RecordingProcessor
from sag.errors import SagConfigError

_NAMES = itertools.count()  # unique hook names, so nested or concurrent perturbations never collide


def _module(net: nn.Module, name: str) -> nn.Module:
    try:
        return net.get_submodule(name)
    except AttributeError:
        raise SagConfigError(f"layer {name!r} is not a module of the network; accepted: fully qualified "
                             "module names (net.named_modules())") from None


@contextmanager
def perturb_modules(net: nn.Module, hooks: dict[str, Callable[[nn.Module], ModelHook]]) -> Iterator[None]:
    """Register ``hooks[name](module)`` (a diffusers ``ModelHook``) on each named module of ``net`` for the
    ``with`` block; every hook is removed afterwards, also on an exception, and each module is left as found."""
    tag = f"sag_perturb_{next(_NAMES)}"
    installed: list[tuple[nn.Module, bool, bool]] = []  # (module, had a registry, had an instance forward)
    try:
        for name, make in hooks.items():
            module = _module(net, name)
            state = (module, hasattr(module, "_diffusers_hook"), "forward" in module.__dict__)
            HookRegistry.check_if_exists_or_initialize(module).register_hook(make(module), tag)
            installed.append(state)
        yield
    finally:
        for module, had_registry, had_forward in reversed(installed):
            registry = module._diffusers_hook
            registry.remove_hook(tag, recurse=False)
            if not registry.hooks and not had_registry:
                del module._diffusers_hook
            if not had_forward and not registry.hooks:
                module.__dict__.pop("forward", None)  # remove_hook leaves the bound forward as an attribute


def _check_identity(name: str, module: nn.Module) -> None:
    if not isinstance(module, Attention) or module.is_cross_attention:
        raise SagConfigError(f"PAG layer {name!r} is not a self-attention layer; accepted: self-attention "
                             "Attention modules (sag.attention.select_layers)")
    if not isinstance(module.processor, AttnProcessor2_0 | RecordingProcessor):  # recording: see unrecorded()
        raise SagConfigError(f"PAG layer {name!r} runs {type(module.processor).__name__}; accepted: "
                             "AttnProcessor2_0 (identity attention replaces its scaled_dot_product_attention)")


def check_identity_attention(net: nn.Module, layers: Iterable[str]) -> None:
    """Refuse (:class:`SagConfigError`) a layer that :func:`identity_attention` cannot perturb: not a
    self-attention ``Attention`` module, or one whose processor does not call SDPA."""
    for name in layers:
        _check_identity(name, _module(net, name))


@contextmanager
def unrecorded(net: nn.Module, layers: Iterable[str]) -> Iterator[None]:
    """While the block runs, each named self-attention module that records attention (a
    :class:`sag.capture.RecordingProcessor` of :func:`sag.capture.capture_attention`, which accepts such a layer only
    when it ran ``AttnProcessor2_0``) runs ``AttnProcessor2_0`` again; the recorder is put back in ``finally``.
    Other modules (transformer blocks, layers not recorded) are left alone. See the module docstring."""
    swapped: list[tuple[nn.Module, RecordingProcessor]] = []
    try:
        for name in layers:
            module = _module(net, name)
            if isinstance(module, Attention) and isinstance(module.processor, RecordingProcessor):
                swapped.append((module, module.processor))
                module.set_processor(AttnProcessor2_0())
        yield
    finally:
        for module, recorder in reversed(swapped):
            module.set_processor(recorder)


def _identity_hook(name: str) -> Callable[[nn.Module], ModelHook]:
    def make(module: nn.Module) -> ModelHook:
        _check_identity(name, module)
        return AttentionProcessorSkipHook(skip_processor_output_fn=None, skip_attention_scores=True)
    return make


@contextmanager
def identity_attention(net: nn.Module, layers: Iterable[str]) -> Iterator[None]:
    """PAG's perturbation for the ``with`` block: the self-attention map of each layer in ``layers`` (fully
    qualified names, e.g. from :func:`sag.attention.select_layers`) is the identity, so the layer outputs its
    value projection (diffusers' ``skip_attention_scores`` hook; see the module docstring)."""
    layers = list(layers)
    with unrecorded(net, layers), perturb_modules(net, {name: _identity_hook(name) for name in layers}):
        yield


def _registered(registry, cls: type):
    """diffusers' metadata of ``cls`` in ``registry`` (AttentionProcessorRegistry / TransformerBlockRegistry), or
    None where diffusers registers none."""
    try:
        return registry.get(cls)
    except ValueError:
        return None


def skippable_modules(net: nn.Module) -> dict[str, nn.Module]:
    """Modules SLG can skip, by fully qualified name: self-attention layers and transformer blocks of a class that
    diffusers' ``TransformerBlockRegistry`` knows (e.g. ``BasicTransformerBlock``), in definition order."""
    return {name: m for name, m in net.named_modules()
            if (isinstance(m, Attention) and not m.is_cross_attention)
            or _registered(TransformerBlockRegistry, type(m)) is not None}


def select_skippable(net: nn.Module, patterns: str | Iterable[str]) -> list[str]:
    """Names of the modules SLG skips: globs or ``re:`` patterns (as :mod:`sag.attention`) over
    :func:`skippable_modules`; each pattern must match one. A module inside another selected one is dropped
    (the outer skip already removes it)."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns:
        raise SagConfigError("no SLG layer pattern given; accepted: glob or 're:<regex>' patterns")
    pool = skippable_modules(net)
    chosen: list[str] = []
    for p in patterns:
        hits = [n for n in pool if _matches(p, n)]
        if not hits:
            raise SagConfigError(f"SLG layer pattern {p!r} matches no self-attention layer or transformer block; "
                                 f"available: {', '.join(pool) or '(none)'}")
        chosen += [n for n in hits if n not in chosen]
    return [n for n in pool if n in chosen and not any(n.startswith(o + ".") for o in chosen)]


def _skip_output(name: str, module: nn.Module):
    """diffusers' skip output function of an attention module's processor (None for a transformer block)."""
    if not isinstance(module, Attention):
        if _registered(TransformerBlockRegistry, type(module)) is None:
            raise SagConfigError(f"SLG layer {name!r} is a {type(module).__name__}; accepted: a self-attention "
                                 "layer or a transformer block diffusers registers (skippable_modules)")
        return None
    proc = AttnProcessor2_0 if isinstance(module.processor, RecordingProcessor) else type(module.processor)
    meta = _registered(AttentionProcessorRegistry, proc)  # a recorder is swapped back at skip time (unrecorded)
    if meta is None:
        raise SagConfigError(f"SLG layer {name!r} runs {type(module.processor).__name__}, for which diffusers "
                             "registers no skip output; accepted: AttnProcessor2_0 or a transformer block")
    return meta.skip_processor_output_fn


def check_skip_layers(net: nn.Module, layers: Iterable[str]) -> None:
    """Refuse (:class:`SagConfigError`) a module that :func:`skip_layers` cannot skip."""
    for name in layers:
        _skip_output(name, _module(net, name))


class BlockSkipHook(TransformerBlockSkipHook):
    """diffusers' ``TransformerBlockSkipHook(dropout=1.0)`` with the skipped block's outputs in the block's own order:
    diffusers returns ``(hidden_states, encoder_hidden_states)``, but e.g. SD3's ``JointTransformerBlock`` and Flux's
    ``FluxTransformerBlock`` / ``FluxSingleTransformerBlock`` return ``(encoder_hidden_states, hidden_states)``; the
    ``TransformerBlockRegistry`` metadata's ``return_*_index`` (``diffusers/hooks/_helpers.py``) place each."""

    def new_forward(self, module: nn.Module, *args, **kwargs):
        meta = self._metadata
        hidden = meta._get_parameter_from_args_kwargs(meta.hidden_states_argument_name, args, kwargs)
        if meta.return_encoder_hidden_states_index is None:
            return hidden
        out = [None, None]
        out[meta.return_hidden_states_index] = hidden
        out[meta.return_encoder_hidden_states_index] = meta._get_parameter_from_args_kwargs(
            meta.encoder_hidden_states_argument_name, args, kwargs)
        return tuple(out)


def _skip_hook(name: str) -> Callable[[nn.Module], ModelHook]:
    def make(module: nn.Module) -> ModelHook:
        output_fn = _skip_output(name, module)
        if output_fn is None:
            return BlockSkipHook(dropout=1.0)
        return AttentionProcessorSkipHook(output_fn)
    return make


@contextmanager
def skip_layers(net: nn.Module, layers: Iterable[str]) -> Iterator[None]:
    """SLG's perturbation for the ``with`` block: each named module (from :func:`select_skippable`) returns its
    ``hidden_states`` input (diffusers' layer-skip hooks; see the module docstring)."""
    layers = list(layers)
    with unrecorded(net, layers), perturb_modules(net, {name: _skip_hook(name) for name in layers}):
        yield
