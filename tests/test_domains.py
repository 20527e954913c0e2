"""The embedded domain's helpers only for models that declare it (sag.domains); user-supplied object masks
(analysis.masks_source). The foreign model is ``tiny_pixel`` (a random 32x32 RGB UNet that declares no domain) and a
random DDPM folder saved with ``save_pretrained``; ``tiny_pixel_cond`` is the declared test stand-in."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import cli
from diffusers import DDPMPipeline, DDPMScheduler
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from analysis.driver import run_studies
from analysis.masks_source import ObjectMasks
from analysis.studies import Settings
from experiments import capture
from experiments.sweeps import prepare_sweep
from sag.domains import EMBEDDED, declared_domain, model_domain, require_domain
from sag.errors import SagConfigError
from sag.models.diffusers_dir import load_diffusers_dir
from sag.models.tiny import PIXEL_SCHEDULE, tiny_pixel_unet
from sag.probe import SAMPLE_MASKS_FILE, probe_scenes

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
SEEDS = [0, 1, 2]
# small and fast: one psi, the layers' native patches, few random draws and bootstrap resamples
SETTINGS = Settings(psis=[1.0], sources=["final"], random_draws=3, n_boot=20, progress=False)


@pytest.fixture(scope="module")
def foreign_run(tmp_path_factory):
    """A capture of the foreign tiny_pixel (debug=tiny): 3 seeds x 2 steps, every attention layer."""
    run = tmp_path_factory.mktemp("foreign") / "run"
    GlobalHydra.instance().clear()
    argv, sys.argv = sys.argv, ["capture", "debug=tiny", "seeds=0-2", "batch_size=3", "steps=2",
                                f"hydra.run.dir={run}"]
    try:
        capture.main()
    finally:
        sys.argv = argv
    assert json.loads((run / "run.json").read_text())["model"]["domain"] is None
    return run


def _write_masks(folder, seeds, hw=(32, 32), png=()):
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    masks = {s: rng.random(hw) < 0.4 for s in seeds}
    for s, m in masks.items():
        if s in png:
            Image.fromarray((m * 255).astype(np.uint8)).save(folder / f"{s:06d}.png")
        else:
            np.savez(folder / f"{s}.npz", mask=m)
    return masks


def test_declared_domains_and_the_one_line_refusal(tiny_pixel, tiny_pixel_cond):
    assert tiny_pixel.domain is None and tiny_pixel_cond.domain == EMBEDDED
    assert tiny_pixel.describe()["domain"] is None
    require_domain(tiny_pixel_cond, "the helper", ["x"])
    with pytest.raises(SagConfigError, match=r"^the helper applies only .* 'tiny_pixel' declares no domain; "
                                             r"accepted: a; or b$"):
        require_domain(tiny_pixel, "the helper", ["a", "b"])
    # a run.json description before the "domain" key: only the embedded model's declares it
    assert model_domain({"name": "embedded", "source": "embedded"}) == ("embedded", EMBEDDED)
    assert model_domain({"name": "ddpm", "source": "/x"}) == ("ddpm", None)
    assert declared_domain("d", {}, {"sag_domain": EMBEDDED}) == EMBEDDED
    with pytest.raises(SagConfigError, match="domain 'cifar' is unknown"):
        declared_domain("d", {"sag_domain": "cifar"})


def test_a_ddpm_folder_declares_its_domain_in_model_index(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        DDPMPipeline(tiny_pixel_unet(), DDPMScheduler(**PIXEL_SCHEDULE)).save_pretrained(tmp_path)
    assert load_diffusers_dir(str(tmp_path)).domain is None  # a random DDPM folder: no domain
    index = json.loads((tmp_path / "model_index.json").read_text())
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "sag_domain": EMBEDDED}))
    assert load_diffusers_dir(str(tmp_path)).domain == EMBEDDED
    DDPMPipeline.from_pretrained(tmp_path)  # diffusers still loads the folder (it ignores the extra key)
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "sag_domain": "cifar10"}))
    with pytest.raises(SagConfigError, match="sag_domain.*'cifar10' is unknown"):
        load_diffusers_dir(str(tmp_path))


def test_the_scenes_probe_refuses_a_foreign_model(tiny_pixel, tmp_path):
    with pytest.raises(SagConfigError, match="scenes probe .* declares no domain"):
        probe_scenes(tiny_pixel, tmp_path / "probe", layers=["mid_block.attentions.0"], ts=[100], count=2)
    assert not (tmp_path / "probe").exists()


def test_studies_with_correlation_refuse_a_foreign_model_in_one_line(foreign_run, capsys, tmp_path):
    code, err, _ = cli(capsys, "studies", "debug=tiny", f"run_dir={foreign_run}", f"hydra.run.dir={tmp_path / 's'}")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    for alternative in ("studies=[timesteps,frequency]", "object_masks=files object_masks_dir=", EMBEDDED):
        assert alternative in err
    assert not (foreign_run / "studies").exists() and not (foreign_run / "tables").exists()  # before any work
    # capturing first (run_dir=null): refused before the capture
    code, err, _ = cli(capsys, "studies", "debug=tiny", "correlation_modes=[samples]",
                       f"hydra.run.dir={tmp_path / 'c'}")
    assert code == 2 and "embedded segmenter" in err and not (tmp_path / "c" / "records").exists(), err


def test_timesteps_and_frequency_still_run_on_a_foreign_model(foreign_run):
    result = run_studies(foreign_run, SETTINGS, studies=["timesteps", "frequency"])
    assert {"attention_timesteps", "frequency", "stats"} <= set(result.tables)
    assert "object_correlation" not in result.tables


def test_user_mask_files_give_correlation_on_samples(foreign_run, tmp_path):
    folder = tmp_path / "masks"
    masks = _write_masks(folder, SEEDS, png=(2,))
    source = ObjectMasks.parse("files", str(folder))
    result = run_studies(foreign_run, SETTINGS, studies=["correlation"], modes=["samples"], object_masks=source)
    corr, stats = result.tables["object_correlation"], result.tables["stats"]
    assert set(corr["mode"]) == {"samples"} and set(corr["object_masks"]) == {f"files:{folder.resolve()}"}
    assert set(stats["object_masks"]) == {f"files:{folder.resolve()}"}
    stored = np.load(foreign_run / SAMPLE_MASKS_FILE)
    assert np.array_equal(stored["object_mask"], np.stack([masks[s] for s in SEEDS]))  # PNG and NPZ read alike
    assert str(stored["source"]) == source.label


@pytest.mark.parametrize("make, message", [
    (lambda d: _write_masks(d, SEEDS[:2]), r"lacks the masks of 1 of 3 seeds \(2\)"),
    (lambda d: _write_masks(d, SEEDS, hw=(16, 16)), r"accepted: the samples' \(H, W\) = \[32, 32\]"),
    (lambda d: (_write_masks(d, SEEDS), np.savez(d / "000001.npz", mask=np.ones((32, 32), bool))),
     "two masks of seed 1"),
])
def test_bad_mask_files_are_refused_before_any_study(foreign_run, tmp_path, make, message):
    make(tmp_path / "m")
    stored = foreign_run / SAMPLE_MASKS_FILE
    before = stored.read_bytes() if stored.exists() else None
    with pytest.raises(SagConfigError, match=message):
        run_studies(foreign_run, SETTINGS, studies=["timesteps", "correlation"], modes=["samples"],
                    object_masks=ObjectMasks.parse("files", tmp_path / "m"))
    assert (stored.read_bytes() if stored.exists() else None) == before  # nothing written


def test_object_masks_config_is_checked():
    with pytest.raises(SagConfigError, match="object_masks='mask_rcnn'; accepted: embedded | files"):
        ObjectMasks.parse("mask_rcnn")
    with pytest.raises(SagConfigError, match="needs object_masks_dir"):
        ObjectMasks.parse("files", None)
    assert ObjectMasks.parse("embedded").label == "embedded"


@pytest.mark.parametrize("entry", ["evaluate", "frontier"])
def test_evaluate_refuses_a_foreign_model_before_sampling(entry):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name=entry, overrides=["debug=tiny", "seeds=0-5"])  # tiny_pixel
    with pytest.raises(SagConfigError, match="quality scoring .*'tiny_pixel' declares no domain; accepted: .*"
                                             "reference set of your own .* feature network"):
        prepare_sweep(cfg)  # builds model, scheduler and scorer before any sampling

