"""``abnexp list``: the paper recipes (``experiment=<name>``) with the table and row each reproduces."""
from __future__ import annotations

from abnexp.report.experiments import experiments, format_list


def list_command(argv: list[str]) -> None:
    print(format_list(experiments()))
