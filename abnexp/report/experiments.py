"""The paper recipes shipped in configs/experiment/: their names and metadata, for ``abnexp list``.

Recipes come in families, one folder per paper table (configs/experiment/<table>/): a shared
``_base.yaml`` (the table's common settings and ``experiment.paper`` / ``table`` / ``world_size``)
and one small file per cell or row, which pulls the base in through its defaults list. A recipe's
name is its path below configs/experiment/ without ``.yaml`` (``experiment=cbn_t3/cbn_bs2``);
files whose name starts with ``_`` are shared bases, not recipes.
"""
from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

from omegaconf import OmegaConf

from abnexp.report.paper_tables import TABLES

if TYPE_CHECKING:
    from importlib.abc import Traversable

BASE = "_base.yaml"


def _walk(folder: Traversable, prefix: str, bases: tuple[Traversable, ...], out: dict) -> None:
    base = folder / BASE
    bases = (*bases, base) if base.is_file() else bases
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith(("_", ".")):
            _walk(entry, f"{prefix}{entry.name}/", bases, out)
        elif entry.name.endswith(".yaml") and not entry.name.startswith("_"):
            out[prefix + entry.name[:-5]] = (entry, bases)


def experiment_files() -> dict[str, tuple[Traversable, tuple[Traversable, ...]]]:
    """{recipe name: (its YAML file, the ``_base.yaml`` files of its folder and the folders above,
    outermost first)} for every recipe below the package's configs/experiment/, sorted by name."""
    out: dict = {}
    _walk(resources.files("abnexp.configs") / "experiment", "", (), out)
    return dict(sorted(out.items()))


def _experiment_block(f: Traversable) -> dict:
    return OmegaConf.to_container(OmegaConf.create(f.read_text()).get("experiment") or {}, resolve=False)


def experiments() -> list[dict]:
    """Metadata of every recipe — the ``experiment`` blocks of its bases, then its own — with its
    ``name`` added, sorted by table (in :data:`~abnexp.report.paper_tables.TABLES` order; unknown
    tables last), then by the table's row and column order, then by name."""
    out = []
    for name, (f, bases) in experiment_files().items():
        meta: dict = {}
        for source in (*bases, f):
            meta.update(_experiment_block(source))
        out.append({"name": name, **meta})
    return sorted(out, key=_table_order)


def _table_order(e: dict) -> tuple:
    keys = list(TABLES)
    table = TABLES.get(e.get("table"))
    if table is None:
        return (len(keys), 0, 0, e["name"])
    labels = [c.label for c in table.columns]
    row = table.rows.index(e["row"]) if e.get("row") in table.rows else len(table.rows)
    column = labels.index(e["column"]) if e.get("column") in labels else -1
    return (keys.index(table.key), row, column, e["name"])


def format_list(items: list[dict]) -> str:
    """``abnexp list``: per table (in the order of ``items``) a heading with the table's title, then
    one line per recipe: its name (``experiment=<name>``), row (and column)."""
    width = max((len(e["name"]) for e in items), default=10)
    lines = [f"  {'experiment':{width}s}  row | column"]
    table = object()
    for e in items:
        if e.get("table") != table:
            table = e.get("table")
            title = TABLES[table].title if table in TABLES else "(no paper table)"
            lines += ["", f"{table or '-'}: {title}"]
        cell = e.get("row", "") + (f" | {e['column']}" if e.get("column") else "")
        lines.append(f"  {e['name']:{width}s}  {cell}")
    return "\n".join(lines)
