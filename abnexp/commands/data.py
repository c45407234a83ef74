"""``abnexp data check data=<name> [data.root=PATH] [max_images=N]``: validate a dataset before
hours are spent on it (abnexp.data.check); exits 1 on a problem."""
from __future__ import annotations

import sys

from abnexp.config import compose
from abnexp.data.check import check_dataset
from abnexp.errors import ConfigError

USAGE = "usage: abnexp data check data=<name> [data.root=PATH] [max_images=N]"


def data_command(argv: list[str]) -> None:
    """Prints the check's report; exits with 0 (no problem) or 1.

    Raises:
        ConfigError: bad usage, unknown dataset / key; DatasetError: a missing root.
    """
    if argv[:1] != ["check"]:
        raise ConfigError(USAGE)
    max_images = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("max_images=")]
    overrides = [a for a in argv[1:] if not a.startswith("max_images=")]
    if not any(a.startswith("data=") for a in overrides) or not all(a.startswith("data") for a in overrides):
        raise ConfigError(USAGE)
    cfg = compose(overrides)
    if max_images and not max_images[0].isdigit():
        raise ConfigError(f"max_images={max_images[0]}: expected a number of images per split (0 = all)")
    ok, report = check_dataset(cfg.data.name, cfg.data.root, int(max_images[0]) if max_images else 0)
    print(report)
    sys.exit(0 if ok else 1)
