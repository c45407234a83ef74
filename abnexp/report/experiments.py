"""The paper recipes shipped in configs/experiment/: their metadata, for ``abnexp list`` and the tables."""
from __future__ import annotations

from importlib import resources

from omegaconf import OmegaConf


def experiment_files() -> dict[str, object]:
    """{experiment name: Traversable of its YAML file}, sorted by name."""
    folder = resources.files("abnexp.configs") / "experiment"
    return {f.name[:-5]: f for f in sorted(folder.iterdir(), key=lambda f: f.name) if f.name.endswith(".yaml")}


def experiments() -> list[dict]:
    """Metadata (the ``experiment`` block) of every recipe, with its ``name`` added."""
    out = []
    for name, f in experiment_files().items():
        meta = OmegaConf.to_container(OmegaConf.create(f.read_text()).get("experiment") or {}, resolve=False)
        out.append({"name": name, **meta})
    return out


def format_list(items: list[dict]) -> str:
    """``abnexp list``: one line per experiment: name, table, row (and column)."""
    width = max((len(e["name"]) for e in items), default=10)
    lines = [f"{'experiment':{width}s}  table / row"]
    for e in items:
        cell = e.get("row", "") + (f" | {e['column']}" if e.get("column") else "")
        lines.append(f"{e['name']:{width}s}  {e.get('table', '-')}: {cell}")
    return "\n".join(lines)
