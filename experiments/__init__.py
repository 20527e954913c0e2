"""Hydra entry points (``python -m experiments.<command>``). Importing the package is cheap: heavy modules (torch,
diffusers, sag.*, analysis.*) load inside each command's ``main`` after Hydra has composed the config, so a bad
key or ``--help`` answers in about a second.

It registers two OmegaConf resolvers for the help pages (conf/hydra/help/<command>.yaml): ``${sag_options:model}``
= the options of config group ``model`` (the stems of ``conf/model/*.yaml``, ``_``-prefixed files left out), and
``${sag_show:${key}}`` = a value as it is typed on the command line (``null``, ``[0,0.5]``).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def group_options(group: str) -> str:
    """The options of config group ``group`` (e.g. ``"model"`` or ``"experiment/main"``), comma-separated."""
    names = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))
    return ", ".join(names) if names else "(none)"


def show(value) -> str:
    """``value`` as a command-line override would spell it: None -> ``null``, lists -> ``[a,b]``, bools lower case."""
    value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ",".join(show(v) for v in value) + "]"
    return str(value)


OmegaConf.register_new_resolver("sag_options", group_options, replace=True)
OmegaConf.register_new_resolver("sag_show", show, replace=True)
