"""HTML pieces of the rendered reports (notebooks/*.py): page style, tables, figures with captions, the summary.

Everything is plain HTML and CSS plus one dependency-free script that sorts a table of class ``sag-sortable`` by
the clicked column (numbers numerically, text alphabetically; click again to reverse). The claims summary table
has ``id="sag-summary"`` (the browser test checks that it is visible without scrolling).
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

import pandas as pd

from analysis import summary

STYLE = """<style>
.sag-table{border-collapse:collapse;font-size:13px;margin:4px 0 10px 0}
.sag-table th,.sag-table td{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left !important;vertical-align:top}
.sag-table th{background:#f3f3f3}
#sag-summary td{max-width:260px}
.sag-sortable th{cursor:pointer}
.sag-note{color:#555;font-size:13px;margin:2px 0 8px 0}
figure.sag-fig{margin:8px 0 18px 0} figure.sag-fig img{max-width:min(100%,1150px);height:auto}
figure.sag-fig figcaption{color:#333;font-size:13px;max-width:1100px}
details.sag-details{margin:6px 0}
</style>"""
SORT_SCRIPT = """<script>
if(!window.sagSort){window.sagSort=true;document.addEventListener('click',function(e){
var th=e.target.closest('table.sag-sortable thead th');if(!th)return;var table=th.closest('table');
var i=Array.prototype.indexOf.call(th.parentNode.children,th);var body=table.tBodies[0];
var rows=Array.prototype.slice.call(body.rows);var dir=th.dataset.dir==='asc'?-1:1;th.dataset.dir=dir>0?'asc':'desc';
rows.sort(function(a,b){var x=a.cells[i].textContent.trim(),y=b.cells[i].textContent.trim();
var nx=parseFloat(x),ny=parseFloat(y);if(!isNaN(nx)&&!isNaN(ny))return dir*(nx-ny);return dir*x.localeCompare(y);});
rows.forEach(function(r){body.appendChild(r);});});}
</script>"""
VERDICT_COLOURS = {"supported": "#d8f0dc", "contradicted": "#f8d7d0", "not shown": "#ececec"}


def rel(path: str | Path | None, run_dir: str | Path | None) -> str:
    """``path`` relative to ``run_dir`` (``.`` for the run dir itself, ``../x`` outside it); "none" for None."""
    if path is None:
        return "none"
    if run_dir is None:
        return Path(path).name
    return os.path.relpath(Path(path).resolve(), Path(run_dir).resolve())


def header(run_dir, dirs: dict, tables: list[str]) -> str:
    """The page style, the sort script and one line naming the inputs, paths relative to the run dir."""
    where = "; ".join(f"{k}: {rel(v, run_dir)}" for k, v in dirs.items())
    name = Path(run_dir).name if run_dir else "none"
    return (STYLE + SORT_SCRIPT + f'<p class="sag-note">run <b>{html.escape(name)}</b> ({html.escape(where)}; paths '
            f"relative to the run dir); tables: {html.escape(', '.join(tables) or 'none')}</p>")


def table(df: pd.DataFrame, *, sortable: bool = False, index: bool = False, element_id: str | None = None) -> str:
    """``df`` as a compact HTML table (class ``sag-table``, plus ``sag-sortable`` if ``sortable``)."""
    cls = "sag-table" + (" sag-sortable" if sortable else "")
    out = df.to_html(index=index, border=0, classes=cls, na_rep="", float_format=lambda v: f"{v:.4g}")
    return out.replace("<table ", f'<table id="{element_id}" ', 1) if element_id else out


def figure(fig, text: str) -> str:
    """A matplotlib figure embedded as a PNG (closed afterwards) with its caption under it."""
    from analysis.figures import style

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    style.plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    alt = html.escape(text[:160], quote=True)
    return (f'<figure class="sag-fig"><img src="data:image/png;base64,{data}" alt="{alt}"/>'
            f"<figcaption>{html.escape(text)}</figcaption></figure>")


def claims_table(claims: pd.DataFrame) -> str:
    """The one-screen claims summary (:func:`analysis.summary.claims_summary`), verdict cells coloured,
    ``id="sag-summary"``."""
    full = summary.claims_summary(claims)
    styler = (full.drop(columns="scope").style.hide(axis="index")
              .map(lambda v: f"background-color:{VERDICT_COLOURS.get(v, '')};font-weight:bold;white-space:nowrap",
                   subset=["verdict"])
              .set_table_attributes('id="sag-summary" class="sag-table"'))
    scopes = full[["claim", "scope"]]
    note = "; ".join(f"{c}: {s}" for c, s in scopes.itertuples(index=False))
    return styler.to_html() + f'<p class="sag-note">Primary scopes: {html.escape(note)}.</p>'


def exploratory(claims: pd.DataFrame) -> str:
    """Per claim: the compact layer x t-band overview, and its scopes sorted by |effect| in a collapsed,
    sortable table (:func:`analysis.summary.exploratory_overview`, :func:`~analysis.summary.exploratory_rows`)."""
    parts = []
    for cid in sorted(claims.loc[claims["scope"] == "exploratory", "claim_id"].unique()):
        over = summary.exploratory_overview(claims, cid)
        rows = summary.exploratory_rows(claims, cid)
        text = claims.loc[claims["claim_id"] == cid, "claim"].iloc[0]
        parts.append(f"<h4>{html.escape(cid)}: {html.escape(text)}</h4>" + table(over, index=True)
                     + f'<details class="sag-details"><summary>all {len(rows)} scopes, sorted by |effect| (click a '
                     "column to sort)</summary>" + table(rows, sortable=True) + "</details>")
    return "\n".join(parts) or '<p class="sag-note">no exploratory rows</p>'


def quality(quality_df: pd.DataFrame, bench: pd.DataFrame | None, frontier: pd.DataFrame | None) -> str:
    """The paired quality deltas per guidance setting with calls per image (:func:`analysis.summary.quality_summary`)
    and the unguided reference line."""
    deltas = summary.quality_deltas(quality_df, bench, frontier)
    wide = summary.quality_summary(deltas).reset_index()
    return (table(wide, sortable=True) + f'<p class="sag-note">{html.escape(summary.unguided_line(quality_df))}. '
            "Cells: Δ = setting - unguided on the same seeds with the paired 95 % bootstrap CI; better / worse: "
            "the CI excludes 0. Calls: counted network evaluations per image; time: the benchmark's ratio to "
            "unguided for the same guidance kind.</p>")
