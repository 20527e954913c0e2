"""Study 1 (analysis.timesteps) and the records -> table path (analysis.studies) on synthetic records."""

import numpy as np
import pytest
import torch

from analysis.schemas import TABLES
from analysis.studies import RecordArrays, Settings, open_records, study_frequency, study_timesteps
from analysis.tables import check_rows
from analysis.timesteps import gini, measure_timesteps
from sag.capture import AttentionRecord
from sag.errors import SagConfigError
from sag.records import RecordWriter


def write_records(root, *, steps=3, seeds=(0, 1, 2), grid=(4, 4), x0=True, seed=0):
    """Records of one layer: received maps (mean 1) and row entropy per step; optional x0 (n, 3, 16, 16)."""
    rng = np.random.default_rng(seed)
    writer = RecordWriter(root)
    n = len(seeds)
    for s in range(steps):
        rec = torch.from_numpy(rng.gamma(1.0, size=(n, *grid))).float()
        rec = rec / rec.mean((1, 2), keepdim=True)
        ent = torch.full((n, *grid), 1.5)
        data = {"received": rec, "row_entropy": ent}
        extras = {"x0": torch.from_numpy(rng.normal(size=(n, 3, 16, 16))).float()} if x0 else None
        writer.write_step(batch_index=0, step=s, num_steps=steps, t=torch.full((n,), 900.0 - 300 * s),
                          seeds=list(seeds), records=[AttentionRecord("mid.attn", 0, grid, False, data)],
                          extras=extras)
    writer.close()
    return root


def test_gini_known_values():  # pytest.approx default rel 1e-6: float64 sums of <= 10 terms
    assert gini(np.ones((1, 10)))[0] == pytest.approx(0.0)
    one_hot = np.zeros((1, 10))
    one_hot[0, 3] = 5.0
    assert gini(one_hot)[0] == pytest.approx(0.9)  # (k - 1) / k
    assert gini(np.array([[1.0, 3.0]]))[0] == pytest.approx(0.25)


def test_measure_timesteps_known_answers():
    rng = np.random.default_rng(0)
    received = rng.gamma(1.0, size=(4, 2, 4, 4))
    entropy = np.full((4, 2, 4, 4), np.log(16))  # uniform rows
    df = measure_timesteps(received, entropy, [1.0, 1.3])
    assert len(df) == 4 * 2 * (2 + 2 * 2 + 1)  # entropy, entropy_norm, 2 x (area, iou), gini
    last = df[(df.metric == "mask_iou_last") & (df.step_index == 3)]
    assert np.allclose(last.value, 1.0)  # default rtol 1e-5: a ratio of equal integer counts
    assert np.allclose(df[df.metric == "entropy_norm"].value, 1.0)  # default rtol 1e-5: log(16) / log(16), float64
    assert df[df.metric == "gini"].psi.isna().all() and set(df[df.metric == "mask_area"].psi) == {1.0, 1.3}
    assert len(measure_timesteps(received, None, [1.0])) == 4 * 2 * 3


def test_study_timesteps_table_from_records(tmp_path):
    reader = open_records(write_records(tmp_path / "records"))
    df = study_timesteps(RecordArrays(reader, reader.seeds), [1.0, 1.3], "run", "model")
    assert set(TABLES["attention_timesteps"]) <= set(df.columns)
    check_rows(df, df, "attention_timesteps", expected=3 * 3 * 7)  # steps x seeds x metrics
    assert df.grid.unique().tolist() == ["4x4"] and sorted(df.t.unique()) == [300.0, 600.0, 900.0]


def test_study_frequency_on_final_and_x0(tmp_path):
    reader = open_records(write_records(tmp_path / "records"))
    images = np.random.default_rng(1).normal(size=(3, 3, 16, 16)).astype(np.float32)
    freq, surf = study_frequency(RecordArrays(reader, [0, 1, 2]), images, Settings(patch_sizes=[4, 8]), "run", "model")
    assert set(TABLES["frequency"]) <= set(freq.columns) and set(TABLES["frequency_surface"]) <= set(surf.columns)
    # 3 steps x 2 sources x 2 psi x 3 seeds x 3 regions x bins (patch 4: 2 bins, patch 8: 5 bins)
    check_rows(freq, freq, "frequency", expected=3 * 2 * 2 * 3 * 3 * (2 + 5))
    check_rows(surf, surf, "frequency_surface", expected=3 * 2 * 2 * (16 + 64))


def test_bad_inputs(tmp_path):
    with pytest.raises(SagConfigError, match="no attention records"):
        open_records(tmp_path / "nothing")
    records = RecordArrays(open_records(write_records(tmp_path / "records", x0=False)), [0, 1, 2])
    images = np.zeros((3, 3, 16, 16), np.float32)
    with pytest.raises(SagConfigError, match="no x0"):
        study_frequency(records, images, Settings(), "run", "model")
    with pytest.raises(SagConfigError, match="does not divide"):
        study_frequency(records, images, Settings(patch_sizes=[3], sources=["final"]), "r", "m")
    with pytest.raises(SagConfigError, match="seeds"):
        RecordArrays(records.reader, [0, 7]).get("mid.attn", "received", 0)
    with pytest.raises(SagConfigError, match="psi"):
        Settings(psis=[1.0, -0.5])
    with pytest.raises(SagConfigError, match="sources"):
        Settings(sources=["latent"])
