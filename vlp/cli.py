"""Command lines generated from the config dataclasses (with tyro), and what every script shares.

``parse_cli(cls, argv)`` turns any tree of dataclasses into a command line: every leaf field is a flag
``--section.field`` (dashes or underscores), its docstring is the help text (tyro adds the default and the
choices), sections are help groups, booleans are switches (``--lock-image``, ``--no-eval.zeroshot``) and short
aliases (``--loss`` for ``--loss.name``) are listed beside the long name. ``--config FILE`` (repeatable, later
files win) is read first and becomes the defaults that the flags override. The final values go through
:func:`vlp.config.from_dict`, the same validation a YAML file gets, so a config saved as ``config.yaml`` reloads
to an identical config.

Why tyro: it reads the dataclasses and their attribute docstrings as they are (no second schema, no decorators),
renders grouped help with defaults and choices, and lets a constructor rule decide how each dataclass is built,
which is what lets section classes created at run time (objectives registering their own configs) work unchanged.

User mistakes (an unknown flag, a bad value, a missing value) are found here before tyro parses, so that the user
sees one line (``ConfigError``, printed by :func:`run_cli` with exit status 2) instead of tyro's multi-line panels;
nothing here imports torch.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import difflib
import functools
import inspect
import io
import logging
import os
import re
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from vlp.config import ConfigError, _coerce, _deep_merge, _is_optional, _set_dotted, from_dict, load_yaml

T = TypeVar("T")

_MISSING = object()
_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")
_NONE = ("none", "null", "~")


def setup_logging() -> None:
    """INFO on the main process, WARNING elsewhere (rank from the launcher's environment)."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("webdataset", "PIL", "matplotlib", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_cli(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    """Run ``main(argv)``; a ConfigError (a user mistake) prints one line to stderr and exits with status 2."""
    prog = os.path.basename(sys.argv[0])
    try:
        code = main(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)


# --------------------------------------------------------------------------------------------------------------
# The dataclass tree
# --------------------------------------------------------------------------------------------------------------


def _section_type(tp: Any) -> type | None:
    """The dataclass of a nested section field (not Optional), else None."""
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _init_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _MISSING


def _plain(value: Any) -> Any:
    """Nested dicts/lists of a dataclass tree (also one built without __post_init__)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in _init_fields(type(value))}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _skeleton(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """An instance of ``cls`` holding the field defaults overridden by ``data``, built without running any
    ``__post_init__`` (a root config may be incomplete until its flags are read). Unknown keys and badly typed
    values in ``data`` raise the same ConfigError as :func:`vlp.config.from_dict`."""
    names = [f.name for f in _init_fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        raise ConfigError(f"unknown key {prefix}{unknown[0]}{hint}; valid keys: {', '.join(prefix + n for n in names)}")
    hints = get_type_hints(cls)
    node = object.__new__(cls)
    for f in _init_fields(cls):
        key = f"{prefix}{f.name}"
        section = _section_type(hints[f.name])
        if section is not None:
            given = data.get(f.name, {})
            if not isinstance(given, Mapping):
                raise ConfigError(
                    f"{key}: expected a mapping with keys {[g.name for g in _init_fields(section)]}, got {given!r}"
                )
            default = _field_default(f)
            base = _plain(default) if default is not _MISSING else {}
            value = _skeleton(section, _deep_merge(base, given), f"{key}.")
        elif f.name in data:
            value = _coerce(data[f.name], hints[f.name], key)
        else:
            value = _field_default(f)
        object.__setattr__(node, f.name, value)
    return node


@dataclasses.dataclass
class _Leaf:
    dotted: str
    type: Any
    node: Any  # the skeleton instance that holds the field
    name: str

    @property
    def is_switch(self) -> bool:
        return self.type is bool


def _leaves(node: Any, prefix: str = "") -> list[_Leaf]:
    out = []
    hints = get_type_hints(type(node))
    for f in _init_fields(type(node)):
        if _section_type(hints[f.name]) is not None:
            out.extend(_leaves(getattr(node, f.name), f"{prefix}{f.name}."))
        else:
            out.append(_Leaf(f"{prefix}{f.name}", hints[f.name], node, f.name))
    return out


def _flag(dotted: str, negate: bool = False) -> str:
    """tyro's spelling of a field's flag: ``--loss.chunk-size``; the negated switch ``--model.no-lock-image``."""
    parts = dotted.replace("_", "-").split(".")
    if negate:
        parts[-1] = "no-" + parts[-1]
    return "--" + ".".join(parts)


# --------------------------------------------------------------------------------------------------------------
# Help text: each field's attribute docstring
# --------------------------------------------------------------------------------------------------------------


def _reflow(doc: str) -> str:
    """A docstring as help text: indentation removed, lines of a paragraph joined (tyro wraps them itself)."""
    paragraphs = re.split(r"\n\s*\n", inspect.cleandoc(doc))
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


@functools.cache
def _attribute_docs(klass: type) -> dict[str, str]:
    """The string literal under each annotated field of ``klass``'s source (none for classes made at run time)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    except (OSError, TypeError, SyntaxError):
        return {}
    if not tree.body or not isinstance(tree.body[0], ast.ClassDef):
        return {}
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = _reflow(nxt.value.value)
    return docs


def class_help(cls: type) -> str | None:
    """A dataclass's docstring (not the signature that @dataclass writes when there is none); a class made at run
    time from a documented base (``make_dataclass(..., bases=(PretrainConfig,))``) has the base's."""
    for klass in cls.__mro__:
        doc = klass.__dict__.get("__doc__")
        if dataclasses.is_dataclass(klass) and doc and not doc.startswith(f"{klass.__name__}("):
            return _reflow(doc)
    return None


def field_help(cls: type, f: dataclasses.Field) -> str | None:
    """Help of a field: ``field(metadata={"help": ...})`` (for classes made at run time), its docstring, or for a
    section without one, the section class's docstring."""
    if "help" in f.metadata:
        return _reflow(str(f.metadata["help"]))
    for klass in cls.__mro__:
        if dataclasses.is_dataclass(klass):
            doc = _attribute_docs(klass).get(f.name)
            if doc is not None:
                return doc
    section = _section_type(get_type_hints(cls).get(f.name))
    return class_help(section) if section is not None else None


# --------------------------------------------------------------------------------------------------------------
# Checking argv before tyro sees it (one-line errors) and accepting the older spellings
# --------------------------------------------------------------------------------------------------------------


def resolve_config_file(path: str) -> Path:
    """A ``--config`` file: a path, or else one of the shipped configs (``ssl/simclr-tiny.yaml``, also written
    ``configs/ssl/simclr-tiny.yaml`` as in the README), so that an installed package finds them from any directory."""
    p = Path(path)
    if p.is_file():
        return p
    from vlp.presets import configs_dir

    rel = p.relative_to("configs") if p.parts[:1] == ("configs",) else p
    shipped = configs_dir() / rel
    return shipped if not p.is_absolute() and shipped.is_file() else p


def _take_config_files(argv: list[str]) -> tuple[list[str], list[str]]:
    files, rest, i = [], [], 0
    while i < len(argv):
        tok = argv[i]
        if tok.replace("_", "-") == "--config":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError("--config needs a YAML file (repeatable: --config a.yaml --config b.yaml)")
            files.append(argv[i + 1])
            i += 2
            continue
        if tok.startswith("--config="):
            files.append(tok.split("=", 1)[1])
        else:
            rest.append(tok)
        i += 1
    return files, rest


def _is_option(tok: str) -> bool:
    if not tok.startswith("-") or tok == "-":
        return False
    try:
        float(tok)
        return False  # a negative number is a value
    except ValueError:
        return True


def _type_label(tp: Any) -> str:
    optional, inner = _is_optional(tp)
    if get_origin(inner) is Literal:
        label = "{" + ",".join(map(str, get_args(inner))) + "}"
    elif get_origin(inner) in (list, tuple, Sequence):
        item = (get_args(inner) or (str,))[0]
        label = f"{getattr(item, '__name__', item)} ...".upper()
    else:
        label = getattr(inner, "__name__", str(inner)).upper()
    return label + ("|None" if optional else "")


def _scalar(tok: str, tp: Any) -> Any:
    """Best-effort conversion of one token to ``tp``; what does not convert is left for _coerce to reject."""
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        found = next((c for c in choices if str(c) == tok), None)
        return found if found is not None else _scalar(tok, type(choices[0])) if choices else tok
    if tp is bool:
        low = tok.lower()
        return True if low in _TRUE else False if low in _FALSE else tok
    for kind in (int, float):
        if tp is kind:
            try:
                return kind(tok)
            except ValueError:
                return tok
    return tok


def _tyro_tokens(value: Any) -> list[str]:
    if value is None:
        return ["None"]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def _check_value(leaf: _Leaf, flag: str, tokens: list[str]) -> Any:
    """The value the tokens given to ``flag`` stand for, checked with the config's own messages."""
    optional, inner = _is_optional(leaf.type)
    label = _type_label(leaf.type)
    if not tokens:
        raise ConfigError(f"{flag} needs a value ({label})")
    if optional and len(tokens) == 1 and tokens[0].lower() in _NONE:
        return None
    if get_origin(inner) in (list, tuple, Sequence):
        (item,) = get_args(inner)[:1] or (str,)
        if len(tokens) == 1 and tokens[0].startswith("["):  # a YAML list, as in config files
            try:
                raw = yaml.safe_load(tokens[0])
            except yaml.YAMLError:
                raw = tokens[0]
            value = raw
        else:
            value = [_scalar(t, item) for t in tokens]
    else:
        if len(tokens) > 1:
            raise ConfigError(f"unexpected argument {tokens[1]!r}: {flag} takes one value ({label})")
        value = _scalar(tokens[0], inner)
    return _coerce(value, leaf.type, leaf.dotted)


def _normalise_argv(
    argv: list[str], leaves: list[_Leaf], aliases: Mapping[str, str]
) -> tuple[list[str], dict[str, Any]]:
    """Raise ConfigError for an unknown flag or a bad value. Returns argv as tyro expects it (switches without a
    value, ``None`` for null, list items as separate tokens) and the values it sets, by dotted name."""
    by_dotted = {leaf.dotted: leaf for leaf in leaves}
    table: dict[str, tuple[_Leaf, bool | None]] = {}  # flag -> (leaf, switch value or None for a valued flag)
    for leaf in leaves:
        names = [leaf.dotted] + [a for a, target in aliases.items() if target == leaf.dotted]
        for name in names:
            if leaf.is_switch:  # --a.b, --a.no-b (tyro's) and --no-a.b
                table[_flag(name)] = (leaf, True)
                table[_flag(name, negate=True)] = (leaf, False)
                table["--no-" + _flag(name)[2:]] = (leaf, False)
            else:
                table[_flag(name)] = (leaf, None)
    for alias, target in aliases.items():
        if target not in by_dotted:
            raise AssertionError(f"alias --{alias} targets unknown key {target}")
    out: list[str] = []
    values_set: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not _is_option(tok):
            raise ConfigError(f"unexpected argument {tok!r} (options are --flags; see --help)")
        name, eq, inline = tok.partition("=")
        key = "--" + name.lstrip("-").replace("_", "-")
        if key not in table:
            valid = sorted(table) + ["--config", "--help"]
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unrecognised argument {name}{hint} (see --help for all options)")
        leaf, switch = table[key]
        j = i + 1
        values = [inline] if eq else []
        while not eq and j < len(argv) and not _is_option(argv[j]):
            values.append(argv[j])
            j += 1
        if switch is not None:  # --flag, --no-flag, or the older --flag true|false
            if values:
                low = values[0].lower()
                if low not in _TRUE + _FALSE:
                    raise ConfigError(
                        f"{leaf.dotted}: expected true or false, got {values[0]!r} ({name} is a "
                        f"switch: {_flag(leaf.dotted)} or {_flag(leaf.dotted, negate=True)})"
                    )
                if len(values) > 1:
                    raise ConfigError(f"unexpected argument {values[1]!r} after {name} {values[0]}")
                switch = switch == (low in _TRUE)
            out.append(_flag(leaf.dotted, negate=not switch))
            values_set[leaf.dotted] = switch
        else:
            values_set[leaf.dotted] = value = _check_value(leaf, name, values)
            out.extend([_flag(leaf.dotted), *_tyro_tokens(value)])
        i = j
    for leaf in leaves:
        if getattr(leaf.node, leaf.name) is _MISSING and leaf.dotted not in values_set:
            raise ConfigError(f"{_flag(leaf.dotted)} is required ({_type_label(leaf.type)})")
    return out, values_set


# --------------------------------------------------------------------------------------------------------------
# tyro
# --------------------------------------------------------------------------------------------------------------


def _struct_rule(root: Any, aliases: Mapping[str, str], config_files: list[str]):
    """A tyro constructor rule for every dataclass: fields with their docstrings and aliases, defaults from the
    skeleton (config files applied), and plain dicts as output (validated afterwards by from_dict)."""
    import tyro
    from tyro.constructors import StructConstructorSpec, StructFieldSpec

    alias_of: dict[tuple[int, str], list[str]] = {}
    for alias, target in aliases.items():
        node = root
        parts = target.split(".")
        for p in parts[:-1]:
            node = getattr(node, p)
        if alias.replace("_", "-") != target.replace("_", "-"):
            alias_of.setdefault((id(node), parts[-1]), []).append("--" + alias)

    def rule(info):
        cls = info.type
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return None
        node = info.default if isinstance(info.default, cls) else None
        hints = get_type_hints(cls, include_extras=True)
        fields = []
        if node is root:
            fields.append(
                StructFieldSpec(
                    name="config",
                    type=Annotated[str | None, tyro.conf.arg(metavar="FILE")],
                    default=" ".join(config_files) or None,
                    helptext="A YAML config, read before the flags; repeatable (--config a.yaml --config b.yaml), "
                    "later files win. A run's config.yaml reloads that run's config.",
                )
            )
        for f in _init_fields(cls):
            default = getattr(node, f.name) if node is not None else _field_default(f)
            tp = hints[f.name]
            names = alias_of.get((id(node), f.name))
            if names:
                tp = Annotated[tp, tyro.conf.arg(aliases=tuple(names))]
            fields.append(
                StructFieldSpec(
                    name=f.name,
                    type=tp,
                    helptext=field_help(cls, f),
                    default=tyro.MISSING_NONPROP if default is _MISSING else default,
                )
            )

        def instantiate(**kwargs: Any) -> dict[str, Any]:
            kwargs.pop("config", None)  # only the root has it; its files were read before tyro ran
            return kwargs

        return StructConstructorSpec(instantiate=instantiate, fields=tuple(fields))

    return rule


def _one_line(text: str) -> str:
    text = re.sub(r"[╭╮╰╯│─┃━]+", " ", text)
    text = re.sub(r"For full helptext,.*", "", text, flags=re.S)
    return " ".join(text.split())


def _run_tyro(
    cls: type,
    root: Any,
    args: list[str],
    aliases: Mapping[str, str],
    config_files: list[str],
    prog: str | None,
    description: str | None,
) -> Any:
    import tyro
    from tyro.constructors import ConstructorRegistry

    registry = ConstructorRegistry()
    registry.struct_rule(_struct_rule(root, aliases, config_files))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            out = tyro.cli(cls, args=args, default=root, registry=registry, prog=prog, description=description)
    except SystemExit as e:
        if e.code not in (0, None):  # not caught by _normalise_argv: still one line
            raise ConfigError(_one_line(err.getvalue()) or f"invalid arguments {args}") from None
        sys.stderr.write(err.getvalue())
        raise
    sys.stderr.write(err.getvalue())
    return out


def parse_cli(
    cls: type[T], argv: Sequence[str], aliases: Mapping[str, str] | None = None, prog: str | None = None
) -> T:
    """Parse ``argv`` into ``cls``: ``--config FILE`` (repeatable, later wins), then ``--section.field VALUE``
    flags and ``aliases`` (``{"loss": "loss.name"}``). ``--help`` prints the generated help and exits."""
    aliases = dict(aliases or {})
    config_files, rest = _take_config_files(list(argv))
    data: dict[str, Any] = {}
    for path in config_files:
        data = _deep_merge(data, load_yaml(resolve_config_file(path)))
    root = _skeleton(cls, data)
    description = class_help(cls) or ""
    if any(t in ("-h", "--help") for t in rest):
        _run_tyro(cls, root, ["--help"], aliases, config_files, prog, description)
    args, values = _normalise_argv(rest, _leaves(root), aliases)
    data = _plain(root)
    for dotted, value in values.items():
        _set_dotted(data, dotted, value)
    from_dict(cls, data)  # every mistake is reported here, in one line, before tyro builds the parser
    out = _run_tyro(cls, root, args, aliases, config_files, prog, description)
    return from_dict(cls, _plain(out))
