"""One claims table over several capture runs (models of different domains), so the effect of the training domain on
the paper's findings is visible side by side (``tables/claims_by_model.parquet`` of the main job).

Each run's ``tables/claims.parquet`` (:mod:`analysis.claims`) gains the columns ``model`` and ``domain`` (from its
``run.json``: the model's name and the domain it declares, :mod:`sag.domains`); rows are otherwise unchanged, so every
verdict is still the one its own run derived (``python -m analysis.claims --check <run>`` re-derives them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from analysis.tables import read_table
from sag.domains import model_domain

NAME = "claims_by_model"
KEYS = ("model", "domain")


def claims_by_model(run_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """The claims rows of every run in ``run_dirs`` (each with ``run.json`` and ``tables/claims.parquet``), with
    ``model`` and ``domain`` first; in the order given."""
    import json

    parts = []
    for run in map(Path, run_dirs):
        info = json.loads((run / "run.json").read_text()).get("model") or {}
        name, domain = model_domain(info)
        claims = read_table(run, "claims")
        parts.append(claims.assign(model=name, domain=domain or "none")[[*KEYS, *claims.columns]])
    return pd.concat(parts, ignore_index=True)


def primary_verdicts(df: pd.DataFrame) -> pd.DataFrame:
    """One row per claim and column per model: the primary scope's verdict and effect, e.g. ``supported (+23.4)``
    (the rows whose ``scope`` is "primary"; an empty frame when there are none)."""
    rows = df[df["scope"] == "primary"]
    if rows.empty:
        return pd.DataFrame()
    cell = rows["verdict"].astype(str) + " (" + rows["effect"].map(lambda v: f"{v:+.3g}") + ")"
    return rows.assign(cell=cell).pivot_table(index=["claim_id", "claim"], columns="model", values="cell",
                                              aggfunc="first")
