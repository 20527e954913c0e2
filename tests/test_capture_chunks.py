"""Capture in query chunks (sag.reductions): chunked == whole-tensor reductions, the log-sum-exp maps == the explicit
softmax's, the row subset == the first rows of a full capture, the official-map regrouping chunked too."""

import pytest
import torch

import sag.capture as capture_mod
from sag.capture import capture_attention
from sag.errors import SagConfigError
from sag.reductions import ChunkedReduction, query_chunk, reduce_probs

pytestmark = pytest.mark.usefixtures("one_thread")
ALL = ["full", "head_mean", "received", "query_subsample", "row_entropy"]
# 16x16 tokens (down_blocks.1 of tiny_pixel at 32x32 input): 4 heads, b 2 -> 2 * 4 * 256 * 4 B = 8 KiB per query
# row; 64 KiB gives chunks of 8 queries, so 32 chunks on that layer and 8 on the 8x8 ones.
SMALL = 1 << 16


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 32, 32, generator=g), torch.tensor([50.0, 600.0])


def _capture(model, x, t, **kw):
    kw.setdefault("lse_maps", False)  # the reference: the explicit softmax (the log-sum-exp maps are the default)
    with torch.no_grad(), capture_attention(model.net, "*", ALL, query_stride=2, **kw) as store:
        out = model(x, t)
    return out, {r.layer: r.data for r in store.pop()}


def _close(a: dict, b: dict, atol: float) -> None:
    """Every reduction within ``atol`` (per-row quantities: probabilities <= 1, entropies); received, a sum over
    N <= 256 queries of such rows, within N x eps32 (1.2e-7) x its largest value (~1.3 here) = 4e-5, the worst-case
    reassociation bound of a float32 sum (observed ~2e-6)."""
    assert a.keys() == b.keys()
    for layer in a:
        assert a[layer].keys() == b[layer].keys()
        for r in a[layer]:
            x, y = a[layer][r], b[layer][r]
            assert x.shape == y.shape, (layer, r)
            tol = max(atol, 4e-5) if r == "received" else atol
            assert torch.allclose(x, y, atol=tol, rtol=0), (layer, r, float((x - y).abs().max()))


def test_chunked_reduction_equals_whole_tensor():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 15, 15, generator=g) * 3, -1)  # grid 3x5, clearly non-uniform rows
    whole = reduce_probs(probs, (3, 5), False, ALL, stride=2)
    one = ChunkedReduction(ALL, (3, 5), False, 2)
    one.add(probs, 0)
    for r, v in one.result().items():  # one chunk: the same operations on the same tensor, bit for bit
        assert torch.equal(v, whole[r]), r
    many = ChunkedReduction(ALL, (3, 5), False, 2)
    for q0 in range(0, 15, 4):  # chunks of 4, 4, 4, 3 queries
        many.add(probs[:, :, q0:q0 + 4], q0)
    got = many.result()
    for r in ("full", "head_mean", "query_subsample", "row_entropy"):  # row-wise: copies of the same rows
        assert torch.equal(got[r], whole[r]), r
    # received adds 4 partial sums over queries instead of one: float32 reassociation of O(1) sums (eps 1.2e-7)
    assert torch.allclose(got["received"], whole["received"], atol=1e-6, rtol=0)


def test_query_chunk_sizes():
    assert query_chunk(1000, 64, 1 << 30) == 64  # all queries in one chunk
    assert query_chunk(1000, 64, 8000) == 8
    assert query_chunk(1000, 64, 10) == 1  # at least one query row, even over the budget


def test_capture_in_chunks_equals_one_chunk(tiny_pixel, inputs):
    ref_out, ref = _capture(tiny_pixel, *inputs)
    out, got = _capture(tiny_pixel, *inputs, chunk_bytes=SMALL)
    assert torch.equal(out, ref_out)  # the layer output never depends on the recording
    # matmul / softmax of row subsets: the same float32 math on each row (BLAS blocking may differ, ~1 ulp of
    # probs <= 1); received: up to 32 chunk partial sums (see _close)
    _close(got, ref, atol=1e-6)


def test_lse_maps_equal_softmax_maps(tiny_pixel, inputs):
    ref_out, ref = _capture(tiny_pixel, *inputs)
    for kw in ({"lse_maps": True}, {"lse_maps": True, "chunk_bytes": SMALL}):
        out, got = _capture(tiny_pixel, *inputs, **kw)
        assert torch.equal(out, ref_out)  # the CPU flash kernel is the one SDPA runs: same output bits
        # exp(s - lse) and its log for the entropy against softmax: float32 rounding of O(1) row sums (eps 1.2e-7) over
        # 256 keys, and entropies ~log(256) = 5.5; received sums 256 such rows
        _close(got, ref, atol=2e-5)
    with torch.no_grad(), capture_attention(tiny_pixel.net, "*", ["received", "row_entropy"], lse_maps=True) as store:
        tiny_pixel(*inputs)  # received + row_entropy only: log p = s - lse, the entropy without a log pass
    _close({r.layer: r.data for r in store.pop()}, {k: {r: v[r] for r in ("received", "row_entropy")}
                                                       for k, v in ref.items()}, atol=2e-5)


def test_explicit_output_in_chunks(tiny_pixel, inputs, monkeypatch):
    """exact=False where the kernel gives no log-sum-exp: one explicit attention, output probs @ v per chunk."""
    ref_out, ref = _capture(tiny_pixel, *inputs)
    monkeypatch.setattr(capture_mod, "attention_with_lse", lambda *a: (None, None))
    out, got = _capture(tiny_pixel, *inputs, exact=False, chunk_bytes=SMALL)
    # as test_capture_in_chunks_equals_one_chunk, plus: layers after the first see inputs changed by the earlier
    # layers' probs @ v outputs (~1e-6, below), so their maps move by a few times that
    _close(got, ref, atol=1e-5)
    # probs @ v instead of the fused kernel: float32 rounding per layer (~1e-6) through 4 layers and the UNet
    assert torch.allclose(out, ref_out, atol=1e-5)


def test_rows_records_the_first_images(tiny_pixel, inputs):
    _, ref = _capture(tiny_pixel, *inputs)
    for kw in ({}, {"chunk_bytes": SMALL}, {"lse_maps": True}):
        _, got = _capture(tiny_pixel, *inputs, rows=1, **kw)
        for layer, data in got.items():
            for r, v in data.items():
                assert v.shape[0] == 1
                if not kw:  # the same per-image matmuls and softmax rows: bit for bit
                    assert torch.equal(v, ref[layer][r][:1]), (layer, r)
                else:  # chunked / lse maps: as the two tests above
                    assert torch.allclose(v, ref[layer][r][:1], atol=4e-5, rtol=0), (layer, r)


def test_official_map_heads_in_chunks(tiny_pixel, inputs):
    def run(**kw):
        with torch.no_grad(), capture_attention(tiny_pixel.net, "*", ALL, query_stride=2, map_heads=2, **kw) as s:
            tiny_pixel(*inputs)
        return {r.layer: r.data for r in s.pop()}

    ref, got = run(), run(chunk_bytes=SMALL)
    assert ref["mid_block.attentions.0"]["full"].shape[1] == 2  # the regrouped pseudo-heads, not the layer's 4
    _close(got, ref, atol=1e-6)  # as test_capture_in_chunks_equals_one_chunk


@pytest.mark.parametrize("kw, match", [({"chunk_bytes": 0}, "chunk_bytes=0"), ({"chunk_bytes": 1.5}, "chunk_bytes"),
                                       ({"rows": 0}, "rows=0")])
def test_bad_chunk_settings(tiny_pixel, kw, match):
    with pytest.raises(SagConfigError, match=match):
        with capture_attention(tiny_pixel.net, "*", **kw):
            pass


def test_explicit_output_of_the_recorded_images_only(tiny_pixel, inputs, monkeypatch):
    """exact=False, lse_maps=False, rows=1 of 2: image 0's output is probs @ v of its recorded probabilities, image 1's
    is SDPA's (called on that image alone); the maps stay the explicit softmax's (lse_maps=False is kept)."""
    ref_out, ref = _capture(tiny_pixel, *inputs, rows=1)
    batches = []
    sdpa = capture_mod.F.scaled_dot_product_attention
    monkeypatch.setattr(capture_mod.F, "scaled_dot_product_attention",
                        lambda q, *a, **k: batches.append(q.shape[0]) or sdpa(q, *a, **k))
    monkeypatch.setattr(capture_mod, "attention_with_lse", lambda *a: pytest.fail("lse_maps=False reached the lse"))
    out, got = _capture(tiny_pixel, *inputs, rows=1, exact=False)
    assert batches == [1] * len(got)  # one SDPA per captured layer, for the unrecorded image only
    # as test_explicit_output_in_chunks: probs @ v differs from the fused kernel by float32 rounding (~1e-6) per layer
    _close(got, ref, atol=1e-5)
    assert torch.allclose(out, ref_out, atol=1e-5)
    # image 0 went through probs @ v (rounding differs from the kernel's); image 1 only through the kernel SDPA runs,
    # with per-image ops everywhere else in this UNet (convs, group norm), so its output is the reference's bit for bit
    assert not torch.equal(out[0], ref_out[0])
    assert torch.equal(out[1], ref_out[1])


def test_nested_capture_keeps_each_sinks_exactness(tiny_pixel, inputs):
    """A study's capture (exact, every image) around SAG's (exact=False, rows=1): the layer output is SAG's own,
    probs @ v for image 0 and SDPA for image 1, bit for bit as without the study's capture (recording changes
    nothing), and the study still gets both images' maps."""
    x, t = inputs
    with torch.no_grad(), capture_attention(tiny_pixel.net, "*", ["received"], rows=1, exact=False, lse_maps=False):
        alone = tiny_pixel(x, t)
    with torch.no_grad(), capture_attention(tiny_pixel.net, "*", ["received"]) as study:
        with capture_attention(tiny_pixel.net, "*", ["received"], rows=1, exact=False, lse_maps=False) as sag:
            nested = tiny_pixel(x, t)
    assert torch.equal(nested, alone)
    assert all(r.data["received"].shape[0] == 2 for r in study.pop())
    assert all(r.data["received"].shape[0] == 1 for r in sag.pop())
