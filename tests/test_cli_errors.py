"""Every row of the README's "Bad input" table, through the real entry points: exit status 2 and one line
``error: ...`` on stderr naming the input, what was wrong and what is accepted; a refused run changes no existing
run dir and leaves nothing that blocks the corrected run.

The entry points run in-process (``experiments.<cmd>.main()`` with ``sys.argv`` set): a subprocess per row would
spend ~6 s on imports each (tests/test_configs.py and tests/test_startup.py run the process-level checks)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from cli_helpers import cli

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = ["debug=tiny", "guidance=none"]  # tiny random pixel UNet, 3 steps, seeds 0-1


class Interrupt(BaseException):
    """Stands in for a kill: passes every ``except Exception``."""


def refused(capsys, command: str, *args: str, match: list[str]) -> str:
    """Run a command that must be refused: exit 2, one ``error:`` line holding every string of ``match``."""
    code, err, out = cli(capsys, command, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err, out)
    for m in match:
        assert m in lines[0], (m, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny capture run (samples, records, .hydra); tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("finished") / "run"
    code, err, _ = cli(_NoCapsys(), "capture", *TINY[:1], f"hydra.run.dir={out}")
    assert code == 0 and (out / "run.json").is_file(), err
    return out


class _NoCapsys:  # module fixtures cannot use capsys; their output is not checked
    def readouterr(self):
        return type("Out", (), {"err": "", "out": ""})()


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(src, dst))


# Rows refused before any model call: (command, overrides, words the line must hold). The older rows (steps=0, layer
# patterns, reductions, a missing model.path, guidance values) are run as subprocesses by tests/test_configs.py.
BEFORE_WORK = [
    ("sample", ["seeds=5-2"], ["seed range '5-2' runs backwards", "accepted"]),
    ("sample", ["seeds=0-99999999"], ["over the maximum 1000000", "accepted: at most"]),
    ("sample", ["nope=3"], ["Could not override 'nope'. To append to your config use +nope=3"]),
    ("sample", ["prompt=a cat"], ["prompt='a cat'", "not a text model", "accepted: prompt=null"]),
    ("sample", ["model=tiny_pixel_cond", "prompt=a cat"], ["not a text model", "accepted: labels=[...] instead"]),
    ("sample", ["labels=[3]"], ["labels=[3]", "not class-conditional", "accepted: labels=null"]),
    ("sample", ["size=[31,31]"], ["size=[31, 31]", "downsamples by 4", "multiples of 4"]),
    ("sample", ["+scheduler.beta_schedule=nope"], ["beta_schedule", "nope", "accepted", "squaredcos_cap_v2"]),
    ("sample", ["scheduler.timestep_spacing=nope"], ["timestep_spacing='nope'", "trailing"]),
    ("sample", ["guidance=sag_cfg"], ["needs a conditional model"]),
    ("capture", ["model=tiny_sd", "capture.layers=[*attn2]"], ["only cross-attention", "capture.include_cross=true"]),
]


@pytest.mark.parametrize(("command", "args", "match"), BEFORE_WORK, ids=[" ".join(r[1]) for r in BEFORE_WORK])
def test_refused_before_work_leaves_no_run_dir(capsys, tmp_path, command, args, match):
    out = tmp_path / "run"
    guided = command == "capture" or any(a.startswith("guidance") for a in args)  # else guidance=none
    refused(capsys, command, *(TINY[:1] if guided else TINY), *args, f"hydra.run.dir={out}", match=match)
    assert not out.exists()  # the fresh dir Hydra made is removed: nothing blocks the corrected run


def test_refused_rerun_keeps_the_finished_run_intact(capsys, finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    refused(capsys, "capture", TINY[0], "steps=4", f"hydra.run.dir={run}", match=["another configuration"])
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # .hydra/config.yaml and overrides.yaml still describe the run's own samples


def test_run_json_of_another_version(capsys, finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    manifest = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(dict(manifest, format_version=0)))
    refused(capsys, "capture", TINY[0], f"hydra.run.dir={run}", match=["run format 0", "use a new run dir"])


def test_size_failure_leaves_nothing_that_blocks_the_corrected_run(capsys, tmp_path):
    import sag.runs

    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:  # a failure at the first model call (as a size the net cannot take)
        mp.setattr(sag.runs, "check_size", lambda model, size: None)
        with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
            cli(capsys, "sample", *TINY, "size=[30,30]", f"hydra.run.dir={out}")
    assert not (out / ".state" / "key.json").exists()
    code, err, _ = cli(capsys, "sample", *TINY, f"hydra.run.dir={out}")
    assert code == 0, err


def test_truncated_sampler_state(capsys, tmp_path, monkeypatch):
    import sag.runs

    out = tmp_path / "run"

    def die(*a, **k):
        raise Interrupt

    with pytest.MonkeyPatch.context() as mp:  # killed after the last step of batch 0, before its batch file
        mp.setattr(sag.runs._RunOutputs, "on_batch_end", die)
        with pytest.raises(Interrupt):
            cli(capsys, "sample", *TINY, f"hydra.run.dir={out}")
    state = out / ".state" / "batch-00000.pt"
    state.write_bytes(state.read_bytes()[:100])
    refused(capsys, "sample", *TINY, f"hydra.run.dir={out}", match=["batch-00000.pt: unreadable sampler state",
                                                                    "delete it"])


def test_non_finite_model_output(capsys, tmp_path, monkeypatch):
    from sag.models.base import DiffusionModel

    monkeypatch.setattr(DiffusionModel, "__call__", lambda self, x, t, cond=None: torch.full_like(x, float("nan")))
    refused(capsys, "sample", *TINY, f"hydra.run.dir={tmp_path / 'run'}",
            match=["non-finite model output", "step 0", "seeds [0, 1]", "accepted: finite outputs"])


@pytest.mark.parametrize(("error", "match"), [
    (PermissionError(errno.EACCES, "Permission denied", "<dir>/.state/key.json"),
     ["key.json: Permission denied (read-only?)", "accepted: a writable output dir"]),
    (OSError(errno.ENOSPC, "No space left on device", "<dir>/.state/key.json"),
     ["no space left on device while writing", "key.json"]),
], ids=["read-only", "disk-full"])
def test_unwritable_output_dir(capsys, tmp_path, monkeypatch, error, match):
    import sag.runs

    def fail(path, data):
        raise error

    monkeypatch.setattr(sag.runs, "atomic_write_bytes", fail)
    refused(capsys, "sample", *TINY, f"hydra.run.dir={tmp_path / 'run'}", match=match)


def test_output_dir_that_cannot_be_made(capsys, tmp_path):
    (tmp_path / "file").write_text("")  # a file where the run dir's parent should be (chmod binds no root)
    refused(capsys, "sample", *TINY, f"hydra.run.dir={tmp_path / 'file' / 'run'}",
            match=["file/run", "Not a directory"])


def test_full_disk_inside_torch_save_names_the_file(capsys, tmp_path, monkeypatch):
    import sag.sampling

    def full(*a, **k):  # what torch's zip writer raises on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:595] . unexpected pos 4544 vs 4436")

    monkeypatch.setattr(sag.sampling.torch, "save", full)
    monkeypatch.setattr(sag.sampling.shutil, "disk_usage", lambda p: type("U", (), {"free": 10 * 2**20})())
    refused(capsys, "sample", *TINY, f"hydra.run.dir={tmp_path / 'run'}",
            match=["no space left on device while writing", ".state/batch-00000.pt"])


def test_multirun_runs_every_valid_job_and_reports_the_refused(capsys, tmp_path):
    code, err, _ = cli(capsys, "sample", "--multirun", *TINY, "model=tiny_pixel,tiny_pixel_cond", "labels=[1]",
                       f"hydra.sweep.dir={tmp_path}")
    assert code == 2 and "1 job(s) of the multirun refused" in err and "not class-conditional" in err
    assert (tmp_path / "1_none" / "run.json").is_file() and not (tmp_path / "0_none").exists()


def test_figures_refuses_unknown_names_formats_and_layers(capsys, finished):
    refused(capsys, "figures", f"run_dir={finished}", "only=[nope]", match=["only=['nope']", "accepted", "masks"])
    refused(capsys, "figures", f"run_dir={finished}", "formats=[bmpx]", match=["formats=['bmpx']", "png"])
    refused(capsys, "figures", f"run_dir={finished}", "only=[timeline]", "options.capture.layer=nope",
            match=["options.capture.layer='nope' is not recorded", "accepted: one of"])


def test_garbled_record_index(capsys, finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    (run / "records" / "index.parquet").write_bytes(b"garbage")
    refused(capsys, "figures", f"run_dir={run}", "only=[timeline]", "formats=[png]",
            match=["index.parquet: unreadable", "delete it to rebuild it"])


def test_corrupt_safetensors_weights(capsys, tmp_path):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(sample_size=8, block_out_channels=(8, 8), down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4
                ).save_pretrained(tmp_path / "unet")
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    refused(capsys, "sample", *TINY, "model=diffusers_dir", f"model.path={tmp_path / 'unet'}",
            f"hydra.run.dir={tmp_path / 'run'}", match=[f"{weights}: not a readable safetensors file"])


def test_scheduler_keys_without_plus(capsys, tmp_path):
    code, err, _ = cli(capsys, "sample", *TINY, "scheduler=ddim", "scheduler.timestep_spacing=trailing",
                       f"hydra.run.dir={tmp_path}")
    assert code == 0, err
    assert json.loads((tmp_path / "run.json").read_text())["scheduler_config"]["timestep_spacing"] == "trailing"
