"""Training objectives: what turns a batch into a loss, one file each, registered by name.

Importing this package registers every objective: each module of this package (except the shared
infrastructure below) and each module named by an installed distribution's ``vlp.objectives`` entry point. A new
objective is one new file here (or in any package that declares the entry point): it defines its config
dataclass and calls :func:`~vlp.objectives.registry.register_objective`. Nothing else changes: the engine looks
objectives up by name, and the command line gains the new config section.

Registration imports no torch; the builders do when a run builds its objective.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from importlib.metadata import entry_points

from vlp.objectives.registry import (
    OBJECTIVES,
    ObjectiveSpec,
    get_objective,
    names,
    register_objective,
    register_section,
    run_config,
    run_config_class,
    section,
)

__all__ = [
    "OBJECTIVES",
    "ObjectiveSpec",
    "get_objective",
    "names",
    "register_objective",
    "register_section",
    "run_config",
    "run_config_class",
    "section",
]

log = logging.getLogger(__name__)

#: modules of this package that hold shared code rather than an objective (they import torch)
INFRASTRUCTURE = frozenset({"registry", "base", "image_text", "evaluation", "ssl_standalone"})
ENTRY_POINT_GROUP = "vlp.objectives"


def _discover() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name not in INFRASTRUCTURE and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            ep.load()
        except ImportError as e:  # a plugin whose dependencies are missing must not break the built-in objectives
            log.warning("objective plugin %s (%s) not loaded: %s", ep.name, ep.value, e)


_discover()
