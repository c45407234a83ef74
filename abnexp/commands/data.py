"""``abnexp data check data=<name> [data.root=PATH] [max_images=N]``: validate a dataset before
hours are spent on it (abnexp.data.check); exits 1 on a problem. ``abnexp data prepare imagenet
src=DIR root=DIR``: the class-folder layout ``data=imagenet`` reads, from ILSVRC2012's official
archives (abnexp.data.imagenet.prepare_imagenet), then the check's counts."""
from __future__ import annotations

import logging
import sys

from abnexp.config import compose
from abnexp.data.check import check_dataset
from abnexp.data.imagenet import ILSVRC2012, prepare_imagenet
from abnexp.errors import ConfigError

USAGE = ("usage: abnexp data check data=<name> [data.root=PATH] [max_images=N] | "
         "abnexp data prepare imagenet src=ARCHIVES_DIR root=DIR")


def _check(overrides: list[str], max_images: list[str]) -> None:
    if not any(a.startswith("data=") for a in overrides) or not all(a.startswith("data") for a in overrides):
        raise ConfigError(USAGE)
    cfg = compose(overrides)
    if max_images and not max_images[0].isdigit():
        raise ConfigError(f"max_images={max_images[0]}: expected a number of images per split (0 = all)")
    ok, report = check_dataset(cfg.data.name, cfg.data.root, int(max_images[0]) if max_images else 0)
    print(report)
    sys.exit(0 if ok else 1)


def _prepare(argv: list[str]) -> None:
    keys = dict(a.split("=", 1) for a in argv[1:] if "=" in a)
    if argv[:1] != ["imagenet"] or set(keys) != {"src", "root"} or len(argv) != 3:
        raise ConfigError(USAGE)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
    counts = prepare_imagenet(keys["src"], keys["root"])
    expected = (ILSVRC2012["train"], ILSVRC2012["val"], ILSVRC2012["classes"])
    got = (counts["train"][1], counts["val"][1], counts["train"][0])
    note = "as ILSVRC2012" if got == expected else "ILSVRC2012 has {:,} / {:,} images, {:,} classes".format(*expected)
    print(f"prepared {keys['root']}: {got[0]:,} training / {got[1]:,} validation images, {got[2]:,} classes ({note})")
    _check(["data=imagenet", f"data.root={keys['root']}", f"data.num_classes={got[2]}"], [])


def data_command(argv: list[str]) -> None:
    """``check``: prints the check's report, exits with 0 (no problem) or 1. ``prepare imagenet``:
    prepares, prints the counts (against ILSVRC2012's), then checks as ``check`` does.

    Raises:
        ConfigError: bad usage, unknown dataset / key; DatasetError: a missing root or archive.
    """
    if argv[:1] == ["prepare"]:
        return _prepare(argv[1:])
    if argv[:1] != ["check"]:
        raise ConfigError(USAGE)
    max_images = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("max_images=")]
    _check([a for a in argv[1:] if not a.startswith("max_images=")], max_images)
