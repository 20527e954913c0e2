"""experiments.figures: writes png/pdf/csv for figures with inputs and skips the others with a reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import fixtures_report as fx
import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

from analysis.figures.build import build_figures, figure_names
from analysis.figures.inputs import SAMPLE_MASKS, images_by_seed, stored_object_masks
from analysis.images import load_images

ROOT = Path(__file__).resolve().parents[1]


def test_build_writes_and_skips(tmp_path):
    run = fx.write_run(tmp_path / "run", names=["frequency", "frequency_surface", "bench"])
    result = build_figures(run, formats=("png",))
    plt.close("all")
    assert set(result.written) == {"frequency", "cost"}
    for name in result.written:
        assert (run / "figures" / f"{name}.png").is_file() and (run / "figures" / f"{name}.csv").is_file()
    assert set(result.skipped) == set(figure_names()) - {"frequency", "cost"}
    assert "object_correlation" in result.skipped["objects"] and "absent" in result.skipped["objects"]
    assert "capture_dir" in result.skipped["timeline"] and "sweep_dir" in result.skipped["qualitative"]


def test_tables_from_other_dirs_and_sweep(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    sweep = fx.write_sweep(tmp_path / "sweep")
    fx.write_run(sweep, names=["quality"])
    result = build_figures(run, sweep_dir=sweep, out_dir=tmp_path / "figs", only=["quality", "qualitative"],
                           formats=("png",))
    plt.close("all")
    assert set(result.written) == {"quality", "qualitative"} and not result.skipped
    assert (tmp_path / "figs" / "qualitative.png").is_file()
    caption = tmp_path / "figs" / "quality.caption.txt"  # figure modules with caption() get one
    assert caption in result.written["quality"] and "paired" in caption.read_text()


def test_figures_read_the_studies_images_and_stored_masks(tmp_path):
    run = fx.write_sweep(tmp_path / "sweep", settings=("none",)) / "0_none"
    imgs = images_by_seed(run, {0, 2, 99})
    assert sorted(imgs) == [0, 2]  # seeds the run lacks are left out
    for s, im in imgs.items():  # the studies' loader, mapped back to pixels exactly
        assert im.dtype == np.uint8 and (im == np.asarray(Image.open(run / "samples" / f"{s:06d}.png"))).all()
    seeds, arr = load_images(run)
    assert seeds == list(fx.SEEDS) and arr.shape == (len(seeds), 3, 32, 32) and arr.min() >= -1 and arr.max() <= 1
    objs, note = stored_object_masks([tmp_path / "cap", run], [0, 1])
    assert objs is None and "absent" in note and "experiments.studies" in note
    masks = np.zeros((2, 32, 32), bool)
    masks[0, :4] = True  # stored first: seed 1
    (run / SAMPLE_MASKS).parent.mkdir(parents=True)
    np.savez_compressed(run / SAMPLE_MASKS, seeds=np.array([1, 0]), object_mask=masks)
    objs, note = stored_object_masks([tmp_path / "cap", run], [0, 1])
    assert sorted(objs) == [0, 1] and objs[1][:4].all() and not objs[0].any() and str(run) in note
    assert stored_object_masks([run], [0, 5])[0] is None  # a seed without a stored mask: no object row


@pytest.mark.slow
def test_cli(tmp_path):
    run = fx.write_run(tmp_path / "run", names=["bench", "attention_timesteps"])
    out = subprocess.run([sys.executable, "-m", "experiments.figures", f"run_dir={run}"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for name in ("cost", "attention_stats"):
        assert f"wrote {name}: {name}.png, {name}.pdf, {name}.csv" in out.stdout
        for ext in ("png", "pdf", "csv"):
            assert (run / "figures" / f"{name}.{ext}").is_file()
    assert "skipped frequency: table(s)" in out.stdout
    assert not (tmp_path / "figures.log").exists() and not (tmp_path / "outputs").exists()
    bad = subprocess.run([sys.executable, "-m", "experiments.figures"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "run_dir=" in bad.stderr
