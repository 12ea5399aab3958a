"""How a schema's fields are made: read from a callable's signature and docstring (`schema_for`:
its keyword arguments, types, defaults and `Args:` lines, so each default and each description
lives in one place, the code), or written by hand with their description (`option`). `described`
lists a schema's keys with their defaults and descriptions: what `--help` prints."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import field
from enum import Enum
from typing import Any

from omegaconf import MISSING

# Where generated schemas live (and are importable from), so that a pickled config (submitit ships
# jobs pickled) refers to the very class in the job's process instead of rebuilding a look-alike.
_SCHEMAS_MODULE = "q2l.config.schemas"


def option(default: Any, about: str) -> Any:
    """A schema field with its one-line description: what `--help` prints (q2l.cli.help)."""
    if dataclasses.is_dataclass(default) or isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": about})
    return field(default=default, metadata={"help": about})


def described(schema: type) -> list[tuple[str, Any, str]]:
    """(key, default, description) of every field of a schema dataclass, in order."""
    rows = []
    for item in dataclasses.fields(schema):
        if item.name.startswith("_"):
            continue
        if item.default is not dataclasses.MISSING:
            default = item.default
        elif item.default_factory is not dataclasses.MISSING:
            default = item.default_factory()
        else:
            default = MISSING
        rows.append((item.name, default, item.metadata.get("help", "")))
    return rows


def schema_for(
    target: Callable,
    runtime: Sequence[str] = (),
    partial: bool = False,
    name: str | None = None,
    with_target: bool = True,
) -> type:
    """A structured-config dataclass with one field per keyword argument of `target`.

    Types and defaults are read from the signature, descriptions from the `Args:` section of its
    docstring; arguments without a default are MISSING (required). `runtime` arguments are
    supplied when the node is instantiated (the model for an optimizer, the backbone for a head)
    and get no field; `partial` adds `_partial_: true`.
    """
    function = target.__init__ if isinstance(target, type) else target
    hints = typing.get_type_hints(function)
    about = argument_docs(target)
    qualified = f"{target.__module__}.{target.__qualname__}"
    specs: list[tuple] = []
    if with_target:
        specs.append(("_target_", str, field(default=qualified)))
    if partial:
        specs.append(("_partial_", bool, field(default=True)))
    for parameter in inspect.signature(target).parameters.values():
        if parameter.name in runtime or parameter.kind in (
            parameter.VAR_POSITIONAL,
            parameter.VAR_KEYWORD,
        ):
            continue
        default = parameter.default
        metadata = {"help": about.get(parameter.name, "")}
        if default is inspect.Parameter.empty:
            spec = field(default=MISSING, metadata=metadata)
        elif isinstance(default, (list, dict, tuple)):
            spec = field(
                default_factory=lambda value=default: (
                    list(value) if isinstance(value, tuple) else value
                ),
                metadata=metadata,
            )
        else:
            spec = field(default=default, metadata=metadata)
        specs.append((parameter.name, _config_type(hints.get(parameter.name, Any)), spec))
    name = name or f"{target.__name__[0].upper()}{target.__name__[1:]}Conf"
    schema = dataclasses.make_dataclass(name, specs)
    schema.__module__ = _SCHEMAS_MODULE
    vars(importlib.import_module(_SCHEMAS_MODULE))[name] = schema
    return schema


def argument_docs(target: Callable) -> dict[str, str]:
    """{argument: the first sentence of its description} from the `Args:` section of a Google-style
    docstring (the class's, else its __init__'s)."""
    docs = inspect.getdoc(target) or ""
    if "Args:" not in docs and isinstance(target, type):
        docs = inspect.getdoc(target.__init__) or ""
    section = docs.partition("Args:")[2]
    found: dict[str, str] = {}
    current = None
    for line in section.splitlines():
        if line and not line.startswith(" "):  # the next section ("Returns:", prose)
            break
        entry = re.match(r"^    (\w+(?:, \w+)*)(?: \([^)]*\))?: (.*)$", line)
        if entry:  # "name: ..." or "name_a, name_b: ..." (one description for several)
            current = entry.group(1)
            found[current] = entry.group(2).strip()
        elif current and line.strip():
            found[current] += " " + line.strip()
    return {
        name: _first_sentence(text) for names, text in found.items() for name in names.split(", ")
    }


def _first_sentence(text: str) -> str:
    """Up to the first full stop that ends a sentence (not "e.g." or "..." inside one)."""
    sentence = re.split(r"(?<![.])(?<!e\.g)(?<!i\.e)\.\s+(?=[A-Z(])", text, maxsplit=1)[0]
    return sentence.rstrip(".")


def _config_type(annotation: Any) -> Any:
    """The nearest type OmegaConf validates: sequences become lists, other unions Any."""
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in arguments if a is not type(None)]
        if len(rest) == 1:
            inner = _config_type(rest[0])
            return Any if inner is Any else typing.Optional[inner]  # noqa: UP045 (OmegaConf needs Optional)
        return Any
    if origin in (list, tuple, Sequence, typing.Sequence) or annotation in (list, tuple):
        item = arguments[0] if arguments else Any
        return list[_config_type(item)] if item in (int, float, str, bool) else list[Any]
    if origin is dict or annotation is dict:
        return dict[str, Any]
    if annotation in (int, float, str, bool) or (
        isinstance(annotation, type) and issubclass(annotation, Enum)
    ):
        return annotation
    return Any
