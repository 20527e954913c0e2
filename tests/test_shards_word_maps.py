"""sag.shards.merge_runs on runs captured with ``capture.word_maps`` (sag.word_maps): the merged run's word maps and
run.json entry equal the one-shot run's, so ``object_masks=cross_attention`` reads a merged run."""

import json
import shutil

import numpy as np
import pytest

from analysis.word_masks import WordMaskSpec
from sag import stages
from sag.capture import CaptureSpec
from sag.errors import SagConfigError
from sag.inputs import conditions, run_inputs
from sag.models.diffusers_dir import PromptEncoder
from sag.models.tiny_sd_pipeline import build_tiny_sd
from sag.schedulers import make_scheduler
from sag.shards import merge_runs
from sag.word_maps import WORD_MAPS_DIR, read_word_maps

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "a dog and a cat"  # tiny tokenizer: dog at column 2, cat at 7 (tests/test_word_maps.py)


def _capture(model, out, shard=None):
    run = run_inputs("0-1", steps=2, batch_size=1, shard=shard)
    return stages.capture_run(model, make_scheduler(model, "ddim"), out, run=run,
                              spec=CaptureSpec(word_maps=["dog", "cat"]), cond=conditions(model, run, prompt=PROMPT),
                              progress=False, prompt=PROMPT, meta=run.meta({"shard": shard}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one-shot run of seeds 0-1, its two shard runs); batch_size 1: the same batches either way."""
    pipe, model = build_tiny_sd(tmp_path_factory.mktemp("tok"))
    model.encode_prompt = PromptEncoder(pipe.tokenizer, pipe.text_encoder)
    root = tmp_path_factory.mktemp("wm_shards")
    _capture(model, root / "single")
    for i in range(2):
        _capture(model, root / "sweep" / str(i), f"{i}/2")
    return root / "single", [root / "sweep" / "0", root / "sweep" / "1"]


def test_merged_word_maps_equal_the_one_shot_runs(runs, tmp_path):
    single, parts = runs
    manifest = merge_runs(parts, tmp_path / "merged")
    a, b = read_word_maps(single), read_word_maps(tmp_path / "merged")
    assert b.seeds == a.seeds == (0, 1) and b.labels == a.labels and np.array_equal(a.maps, b.maps)  # bit for bit
    names = sorted(p.name for p in (single / WORD_MAPS_DIR).iterdir())
    assert names == sorted(p.name for p in (tmp_path / "merged" / WORD_MAPS_DIR).iterdir())
    for name in names:  # the same files, batch indices renumbered as the sample batches
        assert (single / WORD_MAPS_DIR / name).read_bytes() == (tmp_path / "merged" / WORD_MAPS_DIR / name).read_bytes()
    assert manifest["word_maps"] == json.loads((single / "run.json").read_text())["word_maps"]  # every seed's columns
    masks = WordMaskSpec(("dog",)).load([0, 1], (32, 32), tmp_path / "merged")  # the studies' reader takes it
    assert np.array_equal(masks, WordMaskSpec(("dog",)).load([0, 1], (32, 32), single))


def test_merge_refuses_a_shard_without_its_word_maps(runs, tmp_path):
    _, parts = runs
    broken = [tmp_path / "0", tmp_path / "1"]
    for src, dst in zip(parts, broken):
        shutil.copytree(src, dst)
    (broken[1] / WORD_MAPS_DIR / "batch-00000.npz").unlink()
    with pytest.raises(SagConfigError, match=r"missing for sample batch 0 of seeds \[1\]; the run is damaged"):
        merge_runs(broken, tmp_path / "merged")
