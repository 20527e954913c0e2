"""experiments.studies reads Exp. C's inputs (object masks, correlation modes, scenes) only when Exp. C runs, and
refuses them in one line when given without it (in process: tests/cli_helpers.py)."""

from cli_helpers import cli


def test_exp_c_inputs_are_read_only_with_exp_c(tmp_path, capsys):
    (tmp_path / "run").mkdir()  # no records: a run that gets past the config stops at "no attention records"
    base = ["debug=tiny", f"run_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 's'}"]
    # paper_sd15 sets object_masks=files with object_masks_dir=null: refused with Exp. C, not read without it
    code, err, _ = cli(capsys, "studies", *base, "experiment=paper_sd15")
    assert code == 2 and "object_masks=files needs object_masks_dir" in err, err
    code, err, _ = cli(capsys, "studies", *base, "experiment=paper_sd15", "studies=[timesteps,frequency]")
    assert code == 2 and "no attention records" in err, err
    for given in ("object_masks_dir=/nowhere", "object_masks=files", "correlation_modes=[samples]", "scenes.count=4"):
        code, err, _ = cli(capsys, "studies", *base, "studies=[timesteps,frequency]", given)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"{given} is only used by the correlation study (Exp. C); add correlation to studies or drop it" in err
