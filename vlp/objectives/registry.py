"""The objective registry: name -> (config sections, builder), and the run config built from it.

An objective is one file that owns its config dataclass(es) and calls :func:`register_objective`. Registration
is cheap and imports no torch (builders import what they need when called), so the command line, ``--help`` and
the preflight checks know every objective and every one of its options before torch is loaded.

The run config of ``scripts/pretrain.py`` is :class:`vlp.config.PretrainConfig` plus one section per registered
config (e.g. ``ssl.simclr``, ``ssl.views``, ``projector``): :func:`run_config_class` makes that class from the
registry, so a new objective's options appear on the command line without an edit of ``vlp/config.py``.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vlp.config import DEFAULT_LR, LOSS_DEFAULTS, ConfigError, PretrainConfig, from_dict

#: what an objective trains: image-text towers (clip, siglip), the image tower alone (SSL), or a projector
KINDS = ("image_text", "image", "adapter")


@dataclass(frozen=True)
class ObjectiveSpec:
    """One registered objective."""

    name: str
    kind: str
    """image_text (trains both towers on image-caption pairs), image (the image tower on images only) or adapter."""
    build: Callable[..., Any]
    """``build(cfg, world) -> Objective`` (cfg: the run config; world: vlp.distributed.WorldInfo). Objectives
    that train a DualTower also accept ``model=`` and ``preset=`` (a tower built elsewhere, e.g. in tests)."""
    description: str = ""
    auxiliary: Callable[..., Any] | None = None
    """``auxiliary(cfg, model, preset) -> AuxiliaryTerm``: the objective as an extra term beside an image-text
    loss (``--aux-ssl NAME``); None where it cannot be one."""
    loss_defaults: Mapping[str, float | str | None] = field(default_factory=dict)
    """image_text objectives: defaults of the ``loss`` section's None fields (init_logit_scale, ...)."""
    check: Callable[[Any], None] | None = None
    """``check(cfg)``: raise ConfigError for a config this objective cannot run, before a run starts."""
    default_lr: float | None = None
    """The peak learning rate a run of this objective trains at when ``optim.lr`` is unset (None:
    vlp.config.DEFAULT_LR)."""


OBJECTIVES: dict[str, ObjectiveSpec] = {}
#: dotted section path -> config dataclass (e.g. "ssl.simclr" -> SimCLRConfig), in registration order
SECTIONS: dict[str, type] = {}
#: dotted section path -> docstring of a section that only groups others (e.g. "ssl")
GROUP_DOCS: dict[str, str] = {}


def register_section(path: str, config_cls: type, group_doc: str | None = None) -> None:
    """Add a config section at dotted ``path`` (its parent, if any, is a group made for it)."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"section {path}: {config_cls!r} is not a dataclass")
    base = {f.name for f in dataclasses.fields(PretrainConfig)}
    if path.split(".")[0] in base:
        raise ValueError(f"section {path} clashes with PretrainConfig.{path.split('.')[0]}")
    if SECTIONS.get(path, config_cls) is not config_cls:
        raise ValueError(f"section {path} is already registered as {SECTIONS[path].__name__}")
    SECTIONS[path] = config_cls
    if group_doc and "." in path:
        GROUP_DOCS.setdefault(path.rsplit(".", 1)[0], group_doc)
    _RUN_CLASSES.clear()


def register_objective(
    name: str,
    kind: str,
    *,
    sections: Mapping[str, type] | None = None,
    description: str = "",
    auxiliary: Callable[..., Any] | None = None,
    loss_defaults: Mapping[str, float | str | None] | None = None,
    check: Callable[[Any], None] | None = None,
    default_lr: float | None = None,
) -> Callable:
    """Decorator registering ``build(cfg, world) -> Objective`` as objective ``name``, with its config sections."""
    if kind not in KINDS:
        raise ValueError(f"objective {name}: kind must be one of {KINDS}, got {kind!r}")

    def deco(build: Callable[..., Any]) -> Callable[..., Any]:
        for path, cls in (sections or {}).items():
            register_section(path, cls)
        OBJECTIVES[name] = ObjectiveSpec(
            name,
            kind,
            build,
            description or (build.__doc__ or "").strip(),
            auxiliary,
            dict(loss_defaults or {}),
            check,
            default_lr,
        )
        if kind == "image_text":
            LOSS_DEFAULTS[name] = dict(loss_defaults or {})
        return build

    return deco


def get_objective(name: str) -> ObjectiveSpec:
    """The spec registered as ``name``; a ConfigError listing the valid names otherwise."""
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; valid: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


def default_lr(spec: ObjectiveSpec) -> float:
    """The peak learning rate ``spec`` trains at when ``optim.lr`` is unset."""
    return spec.default_lr if spec.default_lr is not None else DEFAULT_LR


def resolve(cfg: Any) -> ObjectiveSpec:
    """The objective a run config names (``contrastive``: the image-text loss ``--loss`` names). An image-text
    objective named directly (``--objective clip``) sets ``cfg.loss.name`` to match."""
    name = cfg.objective
    if name == "contrastive":
        spec = get_objective(cfg.loss.name)
        if spec.kind != "image_text":
            raise ConfigError(
                f"loss.name: {cfg.loss.name!r} is not an image-text loss; valid: {', '.join(names('image_text'))}"
            )
        return spec
    spec = get_objective(name)
    if spec.kind == "image_text" and hasattr(cfg, "loss"):
        cfg.loss.name = name
    if spec.check is not None:
        spec.check(cfg)
    return spec


def auxiliary_term(name: str) -> Callable[..., Any]:
    """The auxiliary-term builder of objective ``name`` (``--aux-ssl name``); a ConfigError listing the valid ones."""
    valid = sorted(n for n, s in OBJECTIVES.items() if s.auxiliary is not None)
    if name not in valid:
        raise ConfigError(f"unknown --aux-ssl {name!r}; valid: {', '.join(valid)}")
    return OBJECTIVES[name].auxiliary  # type: ignore[return-value]


def names(kind: str | None = None) -> list[str]:
    """Registered objective names (of one kind), sorted."""
    return sorted(n for n, s in OBJECTIVES.items() if kind is None or s.kind == kind)


def section(cfg: Any, path: str) -> Any:
    """The config section at dotted ``path`` of a run config, or its defaults when the config has none (a plain
    :class:`PretrainConfig` built in code carries no objective sections)."""
    node = cfg
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            return SECTIONS[path]()
    return node


# --------------------------------------------------------------------------------------------------------------
# The run config class
# --------------------------------------------------------------------------------------------------------------

_RUN_CLASSES: dict[str, type] = {}


def _group_class(prefix: str, children: dict[str, Any]) -> type:
    """A dataclass holding ``children`` (name -> dataclass or nested dict) as defaulted fields."""
    fields = []
    for name, child in children.items():
        cls = child if isinstance(child, type) else _group_class(f"{prefix}.{name}", child)
        fields.append((name, cls, field(default_factory=cls)))
    cls_name = "".join(p.title() for p in prefix.replace("_", ".").split(".")) + "Section"
    doc = GROUP_DOCS.get(prefix, f"{prefix} options.")
    made = dataclasses.make_dataclass(cls_name, fields, namespace={"__doc__": doc})
    made.__module__ = __name__
    setattr(sys.modules[__name__], cls_name, made)  # picklable by name in this process
    return made


def run_config_class(base: type = PretrainConfig) -> type:
    """``base`` plus a field per registered top-level section: the class the command line and config files
    build. Cached until the registry changes."""
    key = f"{base.__module__}.{base.__qualname__}"
    if key in _RUN_CLASSES:
        return _RUN_CLASSES[key]
    tree: dict[str, Any] = {}
    for path, cls in SECTIONS.items():
        node = tree
        parts = path.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = cls
    fields = []
    for name, child in tree.items():
        cls = child if isinstance(child, type) else _group_class(name, child)
        fields.append((name, cls, field(default_factory=cls)))
    made = dataclasses.make_dataclass(base.__name__, fields, bases=(base,), namespace={"__doc__": base.__doc__})
    made.__module__ = __name__
    made.__qualname__ = f"RunConfig_{base.__name__}"
    made.__name__ = made.__qualname__
    setattr(sys.modules[__name__], made.__qualname__, made)
    _RUN_CLASSES[key] = made
    return made


def run_config(data: Mapping[str, Any] | None = None, base: type = PretrainConfig) -> Any:
    """A run config (with every registered section) from nested mappings, e.g. a saved config.yaml."""
    return from_dict(run_config_class(base), dict(data or {}))


def __getattr__(name: str) -> Any:
    """Run-config classes made in another process, by name (so configs unpickle in DataLoader/launcher children)."""
    if name.startswith("RunConfig_PretrainConfig") or name.endswith("Section"):
        import vlp.objectives  # noqa: F401 - registers the built-in sections

        run_config_class()
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
