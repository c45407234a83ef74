"""``abnexp table RUN_DIR|SWEEP_DIR [...] [out=results/tables]``: the papers' tables from runs
(paper | ours | Δ; a run not evaluated yet by its last training-time validation, marked) and their
PNGs (loss curves; CBN Table 3's trend, abnexp.report.plots);
``abnexp table memory [overrides]``: InPlace-ABN Table 3 by the memory planner."""
from __future__ import annotations

from pathlib import Path

from abnexp.errors import ConfigError
from abnexp.report.memory_table import memory_table
from abnexp.report.tables import pending_runs, write_tables

USAGE = "usage: abnexp table RUN_DIR|SWEEP_DIR [...] [out=results/tables] | abnexp table memory [overrides]"


def table_command(argv: list[str]) -> None:
    """Writes the tables and prints their paths.

    Raises:
        ConfigError: no run dir given, or no run with a result (eval.json, or a training-time
            validation in metrics.jsonl) under them.
    """
    if argv[:1] == ["memory"]:
        out = memory_table(Path("results/memory.md"), argv[1:])
        print(f"wrote {out} and {out.with_suffix('.png')}")
        return
    out = Path(next((a.split("=", 1)[1] for a in argv if a.startswith("out=")), "results/tables"))
    paths = [a for a in argv if not a.startswith("out=")]
    if not paths:
        raise ConfigError(USAGE)
    written = write_tables(paths, out)
    pending = pending_runs(paths)
    if pending:
        print(f"left out {len(pending)} run(s) with no result yet (no eval.json, no validation in "
              f"metrics.jsonl): {', '.join(map(str, pending))}")
    if not written:
        raise ConfigError(f"no run with a result under {' '.join(paths)} (eval.json, or a validation row in "
                          f"metrics.jsonl): train until the first validation, or run `abnexp eval checkpoint=...`")
    for path in written:
        print(f"wrote {path}")
