import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from sag.attention import attention_layers, select_layers
from sag.capture import AttentionStore, CaptureSpec, capture_attention, reduce_probs
from sag.errors import SagConfigError
from sag.sampling import sample
from sag.schedulers import make_scheduler

ALL_REDUCTIONS = ["full", "head_mean", "received", "query_subsample", "row_entropy"]


def _processors(net):
    return {n: m.processor for n, m in net.named_modules() if isinstance(m, Attention)}


def _hook_count(net):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in net.modules())


@pytest.mark.parametrize("model_name, scheduler", [("tiny_pixel", "euler_ancestral"), ("tiny_sd", "ddim")])
def test_capture_on_off_gives_identical_samples(request, model_name, scheduler):
    model = request.getfixturevalue(model_name)
    sched = make_scheduler(model, scheduler)
    off = sample(model, sched, steps=4, seeds=[0, 1, 2], batch_size=2, progress=False)
    counts = []
    with capture_attention(model.net, "*", ALL_REDUCTIONS, include_cross=True) as store:
        on = sample(model, sched, steps=4, seeds=[0, 1, 2], batch_size=2, progress=False,
                    callback=lambda s: counts.append(len(store.pop())))
    assert torch.equal(off, on)
    assert counts == [len(attention_layers(model.net, include_cross=True))] * 8  # popped every step


def test_processors_and_hooks_restored_after_exception(tiny_pixel):
    before = _processors(tiny_pixel.net)
    hooks = _hook_count(tiny_pixel.net)

    def boom(step):
        if step.step == 1:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with capture_attention(tiny_pixel.net, "*"):
            sample(tiny_pixel, make_scheduler(tiny_pixel, "ddim"), steps=3, seeds=[0], progress=False,
                   callback=boom)
    after = _processors(tiny_pixel.net)
    assert all(after[n] is before[n] for n in before)
    assert _hook_count(tiny_pixel.net) == hooks


def test_reference_probabilities(tiny_pixel):
    """Our explicit softmax equals diffusers' own AttnProcessor path (get_attention_scores)."""
    net = tiny_pixel.net
    layer = "mid_block.attentions.0"
    attn = dict(net.named_modules())[layer]
    ref = {}
    orig_scores = attn.get_attention_scores

    def spy(q, k, mask=None):
        ref["probs"] = orig_scores(q, k, mask)
        return ref["probs"]

    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([50.0, 600.0])
    attn.set_processor(AttnProcessor())
    attn.get_attention_scores = spy
    try:
        with torch.no_grad():
            net(x, t)
    finally:
        del attn.get_attention_scores
        attn.set_processor(AttnProcessor2_0())
    with torch.no_grad(), capture_attention(net, layer, ["full", "received"]) as store:
        net(x, t)
    (rec,) = store.pop()
    probs = ref["probs"].reshape(2, attn.heads, 64, 64)
    # diffusers scales the scores inside baddbmm, we scale q first: float32 rounding (probs <= 1, eps ~1.2e-7)
    assert torch.allclose(rec.data["full"], probs, atol=1e-6)
    # ... and summed over 64 queries: the rounding above times ~64 at most (received mass ~1 per key)
    assert torch.allclose(rec.data["received"], probs.mean(1).sum(1).reshape(2, 8, 8), atol=1e-5)


def test_reductions_are_consistent():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 12, 12, generator=g) * 3, -1)
    out = reduce_probs(probs, (3, 4), False, ALL_REDUCTIONS, stride=2)
    mean = probs.mean(1)
    assert torch.equal(out["head_mean"], mean)
    # allclose at its defaults (rtol 1e-5): the same float32 sums, possibly reordered
    assert torch.allclose(out["received"], mean.sum(1).reshape(2, 3, 4))
    assert torch.allclose(out["received"].mean((1, 2)), torch.ones(2))  # rows sum to 1 -> mean mass 1
    ent = -(probs * probs.log()).sum(-1).mean(1)
    assert torch.allclose(out["row_entropy"], ent.reshape(2, 3, 4))
    assert torch.equal(out["query_subsample"], mean.reshape(2, 3, 4, 12)[:, ::2, ::2])
    assert out["query_subsample"].shape == (2, 2, 2, 12)


@pytest.mark.parametrize("model_name, size, grids", [
    ("tiny_pixel", (32, 48), {(16, 24), (8, 12)}),
    ("tiny_pixel", (24, 40), {(12, 20), (6, 10)}),
    ("tiny_sd", (16, 24), {(8, 12)}),
])
def test_non_square_grid_from_hidden_states(request, model_name, size, grids):
    model = request.getfixturevalue(model_name)
    x = torch.randn(1, model.in_channels, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture_attention(model.net, "*", ["received"]) as store:
        model(x, torch.tensor([10.0]))
    recs = store.pop()
    assert {r.grid for r in recs} == grids
    assert all(r.data["received"].shape[1:] == r.grid for r in recs)


def test_call_index_counts_model_calls(tiny_pixel):
    x, t = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([10.0])
    with torch.no_grad(), capture_attention(tiny_pixel.net, "mid_block.*") as store:
        tiny_pixel(x, t)
        tiny_pixel(x, t)
    assert [r.call for r in store.pop()] == [0, 1]
    assert store.records == [] and store.call == -1


def test_nested_captures_share_a_layer(tiny_pixel):
    x, t = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([10.0])
    before = _processors(tiny_pixel.net)
    with torch.no_grad(), capture_attention(tiny_pixel.net, "*") as outer:
        with capture_attention(tiny_pixel.net, "mid_block.*", ["head_mean"]) as inner:
            tiny_pixel(x, t)
        tiny_pixel(x, t)
    assert len(inner.pop()) == 1
    assert len(outer.pop()) == 8
    assert all(_processors(tiny_pixel.net)[n] is p for n, p in before.items())


def test_layer_selection(tiny_pixel, tiny_sd):
    assert select_layers(tiny_pixel.net, "mid_block.*") == ["mid_block.attentions.0"]
    assert select_layers(tiny_pixel.net, r"re:up_blocks\.1\.attentions\.\d") == [
        "up_blocks.1.attentions.0", "up_blocks.1.attentions.1"]
    assert len(select_layers(tiny_pixel.net, "*")) == 4
    selfs = select_layers(tiny_sd.net, "*")
    assert selfs and all(n.endswith("attn1") for n in selfs)
    both = select_layers(tiny_sd.net, "*", include_cross=True)
    assert len(both) == 2 * len(selfs)


@pytest.mark.parametrize("pattern, match", [
    ("nothing*", "matches no attention layer; available: down_blocks"),
    ("re:[", "not a valid regex"),
    ("*attn2", "set include_cross=true"),
])
def test_bad_patterns(tiny_sd, pattern, match):
    with pytest.raises(SagConfigError, match=match):
        select_layers(tiny_sd.net, pattern)


def test_bad_spec_values():
    with pytest.raises(SagConfigError, match="accepted"):
        CaptureSpec(reductions=["mean"])
    with pytest.raises(SagConfigError, match="query_stride"):
        CaptureSpec(query_stride=0)
    with pytest.raises(SagConfigError, match="dtype"):
        CaptureSpec(dtype="int8")


def test_failed_install_leaves_model_untouched(tiny_pixel):
    before = _processors(tiny_pixel.net)
    with pytest.raises(SagConfigError):
        with capture_attention(tiny_pixel.net, ["mid_block.*", "missing*"]):
            pass
    assert all(_processors(tiny_pixel.net)[n] is p for n, p in before.items())


def test_store_is_reusable():
    store = AttentionStore()
    store.begin_call()
    assert store.call == 0 and store.pop() == [] and store.call == -1


def test_fast_mode_matches_to_rounding(tiny_pixel):
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([10.0, 700.0])
    with torch.no_grad():
        ref = tiny_pixel(x, t)
        with capture_attention(tiny_pixel.net, "*", ["received"], exact=False) as store:
            fast = tiny_pixel(x, t)
    assert len(store.pop()) == 4
    # probs @ v instead of SDPA's fused kernel: float32 rounding per layer (~1e-6, RecordingProcessor docstring)
    # through 4 captured layers and the rest of the UNet
    assert torch.allclose(fast, ref, atol=1e-5)
