"""Command-line start-up and help: ``--help`` of every entry point says what the command does, and ``--help`` and
a bad run input are answered before torch / diffusers are imported (the heavy imports sit inside each command's
``main``, after Hydra composes the config). Also: files written through :mod:`sag.io` follow the user's umask.

Wall times are not asserted (they belong in benchmarks and depend on the machine's load); the subprocess checks
assert *which modules were loaded*, which is what makes the start-up fast.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from sag import io

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers")  # ~3-5 s of imports here; numpy/pandas (~0.5 s) may load

# Runs one entry point in a fresh interpreter, then reports whether the heavy modules were imported.
PROBE = f"""
import runpy, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
code = 0
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
print("HEAVY:" + ",".join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)
sys.exit(code)
"""

# the first line of each command's own help text (conf/hydra/help/<command>.yaml)
COMMANDS = {
    "capture": "sample seeds and record the self-attention",
    "sample": "guided sampling of a list of seeds",
    "studies": "the paper's attention studies",
    "evaluate": "quality of guidance on paired seeds",
    "frontier": "the quality-cost frontier of SAG",
    "figures": "regenerate the figures of a run dir",
    "merge": "join the shard runs of one configuration",
    "main": "the main job",
    "train": "train the class-conditional diffusion model",
    "train_evaluators": "train the domain evaluators",
}


def probe(module: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", PROBE, module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def heavy_loaded(stderr: str) -> list[str]:
    line = next(ln for ln in stderr.splitlines() if ln.startswith("HEAVY:"))
    return [m for m in line[len("HEAVY:"):].split(",") if m]


def test_help_and_a_bad_input_answer_before_torch_is_imported(tmp_path):
    helped = probe("experiments.sample", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "experiments.sample: guided sampling" in helped.stdout and "Example:" in helped.stdout
    assert heavy_loaded(helped.stderr) == []
    refused = probe("experiments.sample", "steps=0", f"hydra.run.dir={tmp_path / 'run'}")
    assert refused.returncode == 2, refused.stderr
    assert "steps=0" in refused.stderr and "accepted" in refused.stderr
    assert heavy_loaded(refused.stderr) == []


@pytest.fixture
def fresh_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()  # the in-process runs leave Hydra initialised; compose() tests need it clear


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_help_says_what_it_does(command, fresh_hydra, monkeypatch, capsys):
    # in-process (~0.7 s of Hydra composition each); sample also shows overrides and the groups it reads
    extra = ["model=tiny_pixel", "steps=7"] if command == "sample" else []
    module = importlib.import_module(f"experiments.{command}")
    monkeypatch.setattr(sys, "argv", [f"experiments.{command}", "--help", *extra])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code in (0, None)
    out = capsys.readouterr().out
    assert out.startswith(f"experiments.{command}: {COMMANDS[command]}")
    assert "Example:" in out and f"python -m experiments.{command}" in out
    assert "powered by Hydra" not in out  # not Hydra's generic page
    assert "None" not in out  # values shown as typed on the command line (null)
    if command == "sample":
        assert "model (now tiny_pixel): " in out and "tiny_pixel_cond" in out and "steps=7" in out
        assert "main_scale" not in out and "figure" not in out  # groups of other commands are not listed


def test_model_card_help(monkeypatch, capsys):
    module = importlib.import_module("experiments.model_card")
    monkeypatch.setattr(sys, "argv", ["experiments.model_card", "--help"])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 0
    assert "Measure an embedded model's quality" in capsys.readouterr().out


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    import numpy as np
    from safetensors.numpy import save_file  # creates its file with mode 0600 whatever the umask

    old = os.umask(umask)
    try:
        io.atomic_write_text(tmp_path / "a.json", "{}")
        with io.atomic_path(tmp_path / "b.safetensors") as tmp:
            save_file({"x": np.zeros(2, dtype=np.float32)}, str(tmp))
        modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    finally:
        os.umask(old)
    assert modes == {"a.json": 0o666 & ~umask, "b.safetensors": 0o666 & ~umask}


def test_studies_on_a_run_dir_keeps_its_own_dir_inside_it():
    # `run_dir=<dir>`: the job's .hydra/ and log go to <dir>/studies (as the main job sets it), not outputs/ in cwd
    from experiments.studies import own_dir_inside

    argv = ["studies.py", "run_dir=out/capture", "--cfg", "hydra"]
    assert own_dir_inside(argv) == ["studies.py", f"hydra.run.dir={Path('out/capture/studies')}", *argv[1:]]
    for kept in (["s"], ["s", "run_dir=null"], ["s", "run_dir=a", "hydra.run.dir=b"], ["s", "--multirun", "run_dir=a"]):
        assert own_dir_inside(kept) == kept
