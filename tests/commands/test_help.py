"""Help for users: `abnexp`, `abnexp --help`, `abnexp <command> --help` and Hydra's `abnexp train --help`
name what each command does, an example and its README section, and no internal names."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from abnexp.cli import COMMANDS
from conftest import run_cli

ROOT = Path(__file__).resolve().parents[2]
INTERNAL = re.compile(r"schema|_base|COMMANDS|abnexp\.\w|``|(?i:powered by hydra)")


def readme_sections() -> set[str]:
    return {line.lstrip("#").strip() for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("#")}


@pytest.mark.parametrize("argv, code, stream", [([], 2, "err"), (["--help"], 0, "out"), (["-h"], 0, "out"),
                                                (["nonsense"], 2, "err")])
def test_abnexp_alone_lists_every_command_with_an_example(argv, code, stream, capsys):
    got, out, err = run_cli(argv, capsys)
    text = out if stream == "out" else err
    assert got == code and "usage: abnexp <command>" in text
    for name in COMMANDS:
        assert re.search(rf"^  {name} +\S", text, re.MULTILINE), name
        assert f"e.g. abnexp {name}" in text
    assert not INTERNAL.search(text), INTERNAL.search(text)


@pytest.mark.parametrize("name", [n for n in COMMANDS if n != "train"])
def test_command_help_names_usage_example_and_an_existing_readme_section(name, capsys):
    code, out, _ = run_cli([name, "--help"], capsys)
    assert code == 0 and out.startswith(f"abnexp {name}: ")
    assert f"usage: abnexp {name}" in out and f"example: abnexp {name}" in out
    section = re.search(r'section "([^"]+)"', out)[1]
    assert section in readme_sections()
    assert not INTERNAL.search(out), INTERNAL.search(out)


def test_train_help_lists_the_groups_a_user_picks_from_and_nothing_internal(capsys):
    import abnexp.configs

    code, out, _ = run_cli(["train", "--help"], capsys)
    assert code == 0 and out.startswith("abnexp train: ")
    assert not INTERNAL.search(out), INTERNAL.search(out)
    configs = Path(abnexp.configs.__file__).parent
    for group in ("model", "norm", "data", "task", "head", "optim", "sched"):
        line = next(line for line in out.splitlines() if line.startswith(f"  {group} "))
        assert set(re.findall(r"[\w/*]+", line)) >= {p.stem for p in (configs / group).glob("*.yaml")}, group
    families = {p.name for p in (configs / "experiment").iterdir() if p.is_dir()}
    assert {f"{f}/*" for f in families} <= set(re.findall(r"[\w/*]+", out))
    for section in re.findall(r'"([^"]+)"', out.split("More: ", 1)[1]):
        assert any(s.startswith(section) for s in readme_sections()), section
