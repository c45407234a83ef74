"""abnexp's Hydra config tree (one folder per group, one YAML file per option).

Importing this package -- Hydra does when it reads the tree (``pkg://abnexp.configs``) --
stores each option's schema from its axis's table as ``schema/<group>/<option>``
(:func:`abnexp.config.register_options`); each option's YAML file lists that schema first in
its defaults, so a key the option does not have fails at composition.
"""
from abnexp.config import register_options
from abnexp.data import DATASETS
from abnexp.models import MODELS
from abnexp.models.detection import HEADS
from abnexp.norm.registry import NORMS
from abnexp.tasks import TASKS

register_options("model", {name: spec.options for name, spec in MODELS.items()})
register_options("head", {name: spec.options for name, spec in HEADS.items()})
register_options("norm", {name: spec.options for name, spec in NORMS.items()})
register_options("data", {name: spec.options for name, spec in DATASETS.items()})
register_options("task", {name: spec.options for name, spec in TASKS.items()})
