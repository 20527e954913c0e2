"""The capture stage records the guidance's degraded pass (sag.stages ``passes``): per step, the x0 and eps of the
normal and the perturbed pass of PAG / SAG, beside the attention records; the normal pass is the model's own
prediction on the sampler's x_t, the two passes combine to the sampler's guided prediction, the recording leaves the
samples bit-identical, scale 0 records nothing and kinds without a degraded pass are refused."""

import contextlib

import pytest
import torch

from sag.capture import CaptureSpec, capture_attention
from sag.errors import SagConfigError
from sag.guidance import build_guidance
from sag.guidance.family_functions import perturbed_combine
from sag.guidance.functions import sag_combine
from sag.inputs import run_inputs
from sag.records import RecordReader
from sag.runs import load_samples
from sag.sampling import sample
from sag.schedulers import make_scheduler
from sag.stages import PASSES, capture_run, check_passes

pytestmark = pytest.mark.usefixtures("one_thread")
LAYER = "mid_block.attentions.0"  # the 8x8 mid-block self-attention of the tiny pixel UNet
OPTIONS = {"pag": {"pag_scale": 2.0, "pag_layers": LAYER}, "sag": {"sag_scale": 0.75, "layers": "mid_block.*"}}
COMBINE = {"pag": perturbed_combine, "sag": sag_combine}  # eps~ of each kind from its two passes (Eq. 16 for SAG)
SEEDS, LABELS = [0, 1], torch.tensor([1, 2])


def _capture(model, out, kind, passes=PASSES, **options):
    g = build_guidance(model, kind, **(OPTIONS[kind] | options))
    run = run_inputs("0-1", steps=3, batch_size=2)
    spec = CaptureSpec(layers=["*"], reductions=["received"], record_x0=True)
    return g, capture_run(model, make_scheduler(model, "ddim"), out, run=run, spec=spec, cond=LABELS, guidance=g,
                          passes=passes, meta={"guidance": {"kind": kind, **options}}, progress=False)


@pytest.fixture(scope="module", params=["pag", "sag"])
def captured(request, tiny_pixel_cond, tmp_path_factory):
    kind, out = request.param, tmp_path_factory.mktemp(request.param)
    _, manifest = _capture(tiny_pixel_cond, out, kind)
    steps = []  # the same guided trajectory without capture: x_t, t and the sampler's prediction per step
    x = sample(tiny_pixel_cond, make_scheduler(tiny_pixel_cond, "ddim"), steps=3, seeds=SEEDS, cond=LABELS,
               model_fn=build_guidance(tiny_pixel_cond, kind, **OPTIONS[kind]), progress=False,
               callback=lambda s: steps.append(s))
    return kind, out, manifest, steps, x


def test_recorded_passes_are_the_models_own(captured, tiny_pixel_cond):
    kind, out, manifest, steps, x = captured
    m = tiny_pixel_cond
    assert manifest["passes"] == list(PASSES) and torch.equal(load_samples(out)[1], x)  # recording changes nothing
    reader = RecordReader(out / "records")
    g = build_guidance(m, kind, **OPTIONS[kind])  # for its conversions (x0 clipping of the pixel model)
    for s in steps:
        rec = {p: reader.get("", f"passes.{p}", s.step, SEEDS) for p in PASSES}
        # SAG's first pass computes its layers' attention explicitly (capture exact=False, lse_maps=False); PAG's
        # normal pass is the plain call
        how = capture_attention(m.net, g.layers, ["received"], exact=False, lse_maps=False) if kind == "sag" else (
            contextlib.nullcontext())
        with torch.no_grad(), how:
            eps = m.schedule.to_eps(m.split(m(s.x_t, s.t, LABELS))[0], s.x_t, s.t, m.prediction_type)
        # the normal pass is the model's prediction on the sampler's x_t: the same float32 call (capture's exact
        # mode keeps layer outputs bit-identical); 1e-6: float32 rounding of x0 = (x - sqrt(1 - ab) eps) / sqrt(ab)
        assert torch.allclose(rec["eps"], eps, atol=1e-6)
        assert torch.allclose(rec["x0"], g.x0(eps, s.x_t, s.t), atol=1e-6)
        assert (rec["x0"] - rec["x0_perturbed"]).abs().amax() > 1e-3  # the degraded pass differs
        # the two passes combine to the sampler's own guided prediction (eps model); 1e-5: float32 over |eps| ~ 1-3
        guided = COMBINE[kind](rec["eps"], rec["eps_perturbed"], OPTIONS[kind][f"{kind}_scale"])
        assert torch.allclose(guided, s.prediction, atol=1e-5)
    calls = reader.index[(reader.index.layer == LAYER) & (reader.index.reduction == "received")].call
    # attention of the degraded pass is call 1; PAG's identity layer is not recorded there (its map is the identity)
    assert set(calls) == ({0} if kind == "pag" else {0, 1})
    assert 1 in set(reader.index[reader.index.layer != ""].call)


def test_scale_zero_records_no_pass_and_samples_unguided(tiny_pixel_cond, tmp_path):
    ref = sample(tiny_pixel_cond, make_scheduler(tiny_pixel_cond, "ddim"), steps=3, seeds=SEEDS, cond=LABELS,
                 progress=False)
    _capture(tiny_pixel_cond, tmp_path, "pag", pag_scale=0.0)
    assert torch.equal(load_samples(tmp_path)[1], ref)
    index = RecordReader(tmp_path / "records").index
    assert not index.reduction.str.startswith("passes.").any() and (index.reduction == "x0").sum() == 3 * 2


def test_resume_key_holds_the_passes(captured, tiny_pixel_cond, capsys):
    kind, out, manifest, _, _ = captured
    assert _capture(tiny_pixel_cond, out, kind)[1]["resume_key"] == manifest["resume_key"]
    assert "already complete" in capsys.readouterr().out
    with pytest.raises(SagConfigError, match="another configuration"):
        _capture(tiny_pixel_cond, out, kind, passes=["x0"])


@pytest.mark.parametrize("kind", ["none", "cfg", "apg"])
def test_kinds_without_a_degraded_pass_are_refused(tiny_pixel_cond, kind):
    g = build_guidance(tiny_pixel_cond, kind, cfg_scale=1.0)
    with pytest.raises(SagConfigError, match=rf"^passes=\['x0'\] records .* guidance '{kind}' does not have; "
                                             "accepted: passes=\\[\\] or a guidance kind in"):
        check_passes(g, ["x0"], kind)
    assert check_passes(g, [], kind) == []  # nothing to record: accepted for every kind
    with pytest.raises(SagConfigError, match=r"passes has \['x1'\]; accepted: a subset of"):
        check_passes(build_guidance(tiny_pixel_cond, "pag", pag_layers=LAYER), ["x1"])
    with pytest.raises(SagConfigError, match="guidance 'none' does not have"):
        check_passes(None, "x0_perturbed")  # no guidance at all
