"""Prompt-word cross-attention maps (sag.word_maps, DAAM) and the object masks made from them (analysis.word_masks,
``object_masks=cross_attention``), on the tiny random SD pipeline (tokenizer and text encoder built in code)."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import cli

from analysis.driver import run_studies
from analysis.masks_source import ObjectMasks
from analysis.studies import Settings
from analysis.word_masks import WordMaskSpec, parse_word_masks, recorded_words, word_masks
from sag import stages
from sag.capture import CaptureSpec
from sag.errors import SagConfigError
from sag.inputs import conditions, run_inputs
from sag.models.diffusers_dir import PromptEncoder
from sag.models.tiny_sd_pipeline import build_tiny_sd
from sag.runs import load_samples
from sag.schedulers import make_scheduler
from sag.word_maps import (
    WordMapRecorder,
    cross_attention_layers,
    read_word_maps,
    resolve_word_maps,
    token_columns,
)

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a dog and a cat"  # tiny tokenizer: a | dog | a n d | a | cat -> dog at column 2, cat at 7 (+1: start token)
WORDS = ["dog", "cat"]
SETTINGS = Settings(psis=[1.0], sources=["final"], random_draws=3, n_boot=20, progress=False)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """The tiny SD pipeline's model with its own tokenizer and text encoder as the prompt encoder."""
    pipe, model = build_tiny_sd(tmp_path_factory.mktemp("tok"))
    model.encode_prompt = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    return model


def _capture(model, out, words=None, batch_size=2, guidance=None):
    run = run_inputs("0-1", steps=3, batch_size=batch_size)
    return stages.capture_run(model, make_scheduler(model, "ddim"), out, run=run, spec=CaptureSpec(word_maps=words),
                              cond=conditions(model, run, prompt=PROMPT), progress=False, prompt=PROMPT,
                              guidance=guidance)


def _daam(model, calls, merge_idxs, rows, latent=16):
    """(rows, words, latent, latent): DAAM's word heat maps transcribed from castorini/daam 09564e0 -- per image,
    ``UNetCrossAttentionHooker.__call__`` (head_to_batch_dim, get_attention_scores), ``_unravel_attn`` (per head and
    token), ``RawHeatMapCollection.update`` (sum over time per (layer, head)), ``compute_global_heat_map`` (bicubic to
    the latent, clamp, mean over (layer, head)), ``compute_word_heat_map`` (mean over the word's tokens). DAAM runs
    under CFG and keeps the conditional half of its batch; these calls have no unconditional half to drop."""
    out = []
    for r in range(rows):
        heat = {}
        for name, h, e in calls:
            attn = model.net.get_submodule(name)
            query = attn.head_to_batch_dim(attn.to_q(h[r : r + 1]))
            key = attn.head_to_batch_dim(attn.to_k(e[r : r + 1]))
            probs = attn.get_attention_scores(query, key, None)  # (heads, h * w, 77)
            g = math.isqrt(probs.shape[1])  # the tiny UNet's cross-attention grids are square (8x8)
            maps = probs.permute(2, 0, 1).reshape(probs.shape[2], -1, g, g).permute(1, 0, 2, 3)  # (heads, 77, g, g)
            for head, m in enumerate(maps):
                heat[(name, head)] = heat.get((name, head), 0) + m
        merged = [F.interpolate(m.unsqueeze(1), size=(latent, latent), mode="bicubic").clamp_(min=0)
                  for m in heat.values()]
        maps = torch.stack(merged, 0).mean(0)[:, 0]  # (77, latent, latent)
        out.append(torch.stack([maps[idx].mean(0) for idx in merge_idxs]))
    return torch.stack(out), len(heat)


@pytest.fixture(scope="module")
def runs(sd, tmp_path_factory):
    """(plain run, run with word maps, the attn2 inputs hooked during the latter)."""
    root = tmp_path_factory.mktemp("wm")
    _capture(sd, root / "plain")
    calls, handles = [], []
    for name in cross_attention_layers(sd.net):
        hook = (lambda n: lambda _m, args, kw: calls.append((n, args[0], kw["encoder_hidden_states"])))(name)
        handles.append(sd.net.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        _capture(sd, root / "words", WORDS)
    finally:
        for h in handles:
            h.remove()
    return root / "plain", root / "words", calls


def test_recorded_maps_equal_the_daam_transcription_and_leave_samples_bit_identical(sd, runs):
    plain, words, calls = runs
    assert len(calls) == 3 * 4  # 3 steps x 4 attn2 layers, one model call per step
    stored = read_word_maps(words)
    assert stored.labels == ("dog", "cat") and stored.seeds == (0, 1) and stored.maps.shape == (2, 2, 16, 16)
    assert json.loads((words / "run.json").read_text())["word_maps"]["columns"]["1"] == [[2], [7]]
    tok = sd.encode_prompt.tokenizer  # DAAM's compute_token_merge_indices: every occurrence, </w> dropped, +1
    assert token_columns(tok, PROMPT, "and") == [3, 4, 5] and token_columns(tok, PROMPT, "A") == [1, 3, 6]
    expected, n_maps = _daam(sd, calls, [[2], [7]], rows=2)
    assert n_maps == 4 * 8  # (layer, head) maps: 4 attn2 layers x 8 heads; DAAM averages them, sag.word_maps sums
    # float32: exp(s - logsumexp) vs baddbmm + softmax, summed over 3 steps and 32 maps (~1e-6 relative)
    torch.testing.assert_close(torch.from_numpy(stored.maps) / n_maps, expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(expected[:, 0], expected[:, 1])  # two words, two different maps
    (sa, xa), (sb, xb) = load_samples(plain), load_samples(words)
    assert sa == sb and torch.equal(xa, xb)  # hooks only read: samples bit-identical
    for png in (plain / "samples").glob("*.png"):
        assert png.read_bytes() == (words / "samples" / png.name).read_bytes()


def test_interrupted_run_resumes_with_the_same_maps(sd, tmp_path):
    _capture(sd, tmp_path / "ref", WORDS, batch_size=1)
    calls = [0]

    def dies_at_call_5(x, t, cond):  # batch 0: calls 1-3; batch 1 saved after its first step, then killed
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return sd(x, t, cond)

    with pytest.raises(KeyboardInterrupt):
        _capture(sd, tmp_path / "cut", WORDS, batch_size=1, guidance=dies_at_call_5)
    assert (tmp_path / "cut" / ".state" / "word-maps-b00001.pt").is_file()
    _capture(sd, tmp_path / "cut", WORDS, batch_size=1)
    ref, cut = read_word_maps(tmp_path / "ref"), read_word_maps(tmp_path / "cut")
    assert cut.seeds == ref.seeds and np.array_equal(cut.maps, ref.maps)  # bit for bit on the CPU


def test_studies_object_masks_cross_attention_end_to_end(runs):
    _, words, _ = runs
    source = ObjectMasks.parse("cross_attention", cross_attention={"words": ["dog"], "tau": 0.4,
                                                                   "recorded": recorded_words(words)})
    result = run_studies(words, SETTINGS, studies=["correlation"], modes=["samples"], object_masks=source)
    corr, stats = result.tables["object_correlation"], result.tables["stats"]
    assert set(corr["object_masks"]) == {"cross_attention:dog@0.4"} and len(corr)
    assert set(stats.loc[stats["mode"] == "samples", "object_masks"]) == {"cross_attention:dog@0.4"}
    stored = np.load(words / "studies" / "sample_masks.npz")
    expected = word_masks(read_word_maps(words).maps[:, :1], (32, 32), 0.4)
    assert np.array_equal(stored["object_mask"], expected) and 0 < expected.mean() < 1


def test_cfg_batches_keep_the_conditional_half(sd, tmp_path):
    rec = WordMapRecorder(sd, resolve_word_maps(sd, WORDS, PROMPT, [0, 1], [0, 1]), tmp_path / "wm", tmp_path / "st")
    rec.pending = {"layer": torch.arange(4.0).view(4, 1, 1, 1, 1)}  # sag.guidance.cfg rows: [null 0, null 1, cond 0, 1]
    rec.on_step(SimpleNamespace(step=0, seeds=[0, 1], batch_index=0))
    assert rec.sums["layer"].flatten().tolist() == [2.0, 3.0] and (tmp_path / "st" / "word-maps-b00000.pt").is_file()
    rec.pending = {"layer": torch.zeros(3, 1, 1, 1, 1)}
    with pytest.raises(SagConfigError, match="had 3 rows for 2 seeds"):
        rec.on_step(SimpleNamespace(step=1, seeds=[0, 1], batch_index=0))


def test_word_masks_threshold_and_union():
    maps = np.zeros((1, 2, 2, 2), np.float32)
    maps[0, 0, 0, 0], maps[0, 1, 1, 1] = 1.0, 5.0  # word 0 top-left, word 1 bottom-right
    both = word_masks(maps, (8, 8), 0.4)
    assert both.shape == (1, 8, 8) and both[0, 0, 0] and both[0, 7, 7] and not both[0, 0, 7]
    assert not word_masks(np.zeros((1, 1, 2, 2), np.float32), (4, 4), 0.4).any()  # no attention, no pixel
    with pytest.raises(SagConfigError, match="by one factor"):
        word_masks(maps, (8, 6), 0.4)
    assert WordMaskSpec(("dog", "#3"), 0.5).label == "cross_attention:dog,#3@0.5"
    assert parse_word_masks(recorded=["dog", "cat"]).words == ("dog", "cat")  # null: every recorded word


def test_refusals(sd, runs, tiny_pixel, tmp_path, capsys):
    plain, _, _ = runs
    with pytest.raises(SagConfigError, match=r"needs a text model with cross-attention .* object_masks=embedded"):
        resolve_word_maps(tiny_pixel, ["dog"], None, [0], [0])
    with pytest.raises(SagConfigError, match=r"word 'hat' is not in the prompt of seed 0 .*tokens: a dog a n d a cat"):
        resolve_word_maps(sd, ["dog", "hat"], PROMPT, [0, 1], [0, 1])
    with pytest.raises(SagConfigError, match="located in the prompt; got prompt=None"):
        resolve_word_maps(sd, ["dog"], None, [0], [0])
    assert resolve_word_maps(sd, [3], None, [0], [0]).columns == {0: ((3,),)}  # a token column needs no prompt
    with pytest.raises(SagConfigError, match=r"'dog' is cut off the prompt of seed 0 \(column 81 of 77\)"):
        resolve_word_maps(sd, ["dog"], "a " * 80 + "dog", [0], [0])  # CLIP truncates at 77 tokens
    assert recorded_words(plain) == []
    with pytest.raises(SagConfigError, match=r"records none; accepted: a run captured with capture.word_maps"):
        ObjectMasks.parse("cross_attention", cross_attention={"recorded": recorded_words(plain)})
    with pytest.raises(SagConfigError, match=r"has no word maps .*accepted: a run captured with capture.word_maps"):
        WordMaskSpec(("dog",)).load([0, 1], (32, 32), plain)
    with pytest.raises(SagConfigError, match=r"\['hat'\] are not recorded"):
        parse_word_masks(["hat"], recorded=["dog", "cat"])
    with pytest.raises(SagConfigError, match="read only with object_masks=cross_attention"):
        ObjectMasks.parse("embedded", cross_attention={"words": ["dog"]})
    # the CLI: capturing first without word maps is refused in one line, before the capture
    code, err, _ = cli(capsys, "studies", "debug=tiny", "model=tiny_sd", "studies=[correlation]",
                       "correlation_modes=[samples]", "object_masks=cross_attention", f"hydra.run.dir={tmp_path}")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "capture.word_maps" in err, err
    assert not (tmp_path / "records").exists()
