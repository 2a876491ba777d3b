"""Command-line options derived from config dataclasses, so that a default and its help live in one place.

A config dataclass is the single source of a command's options, as cleanrl's `Args` is with tyro:
each field becomes `--field-name`, with the field's default and `metadata["help"]` as its help; a
nested dataclass field (`limits: Limits`) is flattened, its fields under their own names in a help
panel of their own. Typer builds a command from a function's signature, so `config_options` writes
one (`__signature__`) and calls the command with what was given. tyro itself was not used: the
commands are typer's (`assay rm serve` beside `assay eval`), and the existing flags (`--api-key`
repeatable, `--header-timeout`) need names that tyro spells differently.

Field metadata:

    help   the option's help text (required: a field without one is an error)
    flag   the option's name when it is not the field's: `flag="header-timeout"` for header_timeout_s,
           the singular of a repeatable tuple field (`flag="api-key"` for api_keys)
    env    the environment variable the option is read from when it is not given, in place of the one
           `env_prefix` derives; False: none (the command reads its own, as the servers' key lists do)
    cli    False: no option (the command sets the field from options of its own, or leaves its default)

With `env_prefix` (`ASSAY_RM`), every option is also read from `{env_prefix}_{FLAG}` (`--max-items`:
`ASSAY_RM_MAX_ITEMS`), shown in `--help`: a flag beats its variable, the variable beats the default,
and a bad value is refused like the flag's, naming the variable. Values are click's: a bool is
1/0, true/false, yes/no or on/off; a repeatable option takes several values separated by
whitespace, or by `:` for paths (like PATH).

Types: str, int, float, bool (`--x/--no-x`), Path, `X | None` (a number's option also takes the word
`none`), `tuple[X, ...]` (a repeatable option), `Literal[...]` (a choice), and nested dataclasses.

The command receives `given`: a nested dict of the fields set on the command line or by their
environment variable (plus those whose default the command changes), and `build` makes the config
from layers of such dicts, later layers winning. So a file's values can sit under the flags:

    @app.command("grpo")
    @config_options(GRPOConfig)
    def grpo(given: dict, config_file: Path = typer.Option(None)) -> None:
        config = build(GRPOConfig, yaml.safe_load(config_file.read_text()), given)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import typer

GIVEN = {"COMMANDLINE", "ENVIRONMENT"}  # click's ParameterSource names of a value that was given
CONTEXT = "cli_options_context"  # the parameter typer passes its Context in (typer vendors click: no import)
T = TypeVar("T")


class Option(NamedTuple):
    """One option derived from a (possibly nested) field."""

    name: str  # the Python name of the command's parameter: the flag with underscores
    path: tuple[str, ...]  # the field's place in the config: ("limits", "max_items")
    parameter: inspect.Parameter  # what typer reads: annotation and `typer.Option(...)` default


def config_options(
    cls: type,
    *,
    param: str = "given",
    defaults: Mapping[str, Any] | None = None,
    exclude: tuple[str, ...] = (),
    env_prefix: str | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a typer command so that every field of `cls` is one of its options.

    `param` names the command's parameter that receives the nested dict of given values; `defaults`
    changes the default of some fields for this command only (dotted paths: `{"log_level": "info"}`),
    and those are always in `given`; `exclude` (dotted paths) leaves fields out, for the command to
    set from options of its own; `env_prefix` gives every option an environment variable (see the
    module docstring).
    """
    opts = options(cls, defaults=defaults or {}, exclude=exclude, env_prefix=env_prefix)
    by_name = {o.name: o for o in opts}
    changed = {tuple(k.split(".")) for k in defaults or {}}

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for name, p in inspect.signature(command, eval_str=True).parameters.items() if name != param]
        clash = sorted(by_name.keys() & {p.name for p in own})
        if clash:
            raise TypeError(f"{command.__name__}: options {clash} are both its own and {cls.__name__}'s")

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            ctx = kwargs.pop(CONTEXT)
            given: dict[str, Any] = {}
            for name, o in by_name.items():
                value = kwargs.pop(name)
                source = ctx.get_parameter_source(name)
                if o.path in changed or (source is not None and source.name in GIVEN):
                    _put(given, o.path, tuple(value) if isinstance(value, list) else value)
            return command(**kwargs, **{param: given})

        context = inspect.Parameter(CONTEXT, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        parameters = [*own, *(o.parameter for o in opts), context]
        # what typer (through inspect) reads as the function's parameters; typeshed's functions have no such attribute
        run.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        return run

    return decorate


def options(
    cls: type,
    *,
    defaults: Mapping[str, Any] | None = None,
    exclude: tuple[str, ...] = (),
    env_prefix: str | None = None,
) -> list[Option]:
    """The options derived from `cls`'s fields, nested dataclasses flattened (see the module docstring)."""
    opts = list(_options(cls, (), None, defaults or {}, set(exclude), env_prefix))
    seen: dict[str, tuple[str, ...]] = {}
    for o in opts:
        if o.name in seen:
            raise TypeError(
                f"{cls.__name__}: fields {'.'.join(seen[o.name])} and {'.'.join(o.path)} are both "
                f"--{o.name.replace('_', '-')}; give one a metadata flag"
            )
        seen[o.name] = o.path
    return opts


def build(cls: type[T], *layers: Mapping[str, Any] | None) -> T:
    """`cls` from nested mappings of field values, later layers winning; nested dataclasses from nested
    mappings, lists into tuples. A key that is no field is a ValueError naming the fields there are."""
    merged: dict[str, Any] = {}
    for layer in layers:
        _merge(merged, layer or {})
    return _build(cls, merged)


def env_var(prefix: str, flag: str) -> str:
    """The variable `prefix` derives for `--flag`: `env_var("ASSAY_RM", "max-items") == "ASSAY_RM_MAX_ITEMS"`."""
    return f"{prefix}_{flag.replace('-', '_').upper()}"


def _options(
    cls: type,
    prefix: tuple[str, ...],
    panel: str | None,
    defaults: Mapping[str, Any],
    exclude: set[str],
    env_prefix: str | None,
) -> Iterator[Option]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = (*prefix, f.name)
        if ".".join(path) in exclude or f.metadata.get("cli", True) is False:
            continue
        kind = hints[f.name]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            yield from _options(
                kind, path, f.metadata.get("help") or f.name.capitalize(), defaults, exclude, env_prefix
            )
            continue
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} has no help: field(..., metadata={{'help': ...}})")
        default = defaults.get(".".join(path), _default(f))
        yield _option(path, f, kind, default, panel, env_prefix)


def _option(
    path: tuple[str, ...], f: dataclasses.Field, kind: Any, default: Any, panel: str | None, env_prefix: str | None
) -> Option:
    flag = f.metadata.get("flag", f.name).replace("_", "-")
    envvar = f.metadata.get("env", env_var(env_prefix, flag) if env_prefix else None) or None
    name = flag.replace("-", "_")
    extra: dict[str, Any] = {}
    inner, optional = _unwrap_optional(kind)
    annotation: Any = kind
    if typing.get_origin(inner) is tuple:
        item, _ = typing.get_args(inner)
        # a type built at run time for typer to read: mypy takes `item` for a variable, not a type
        annotation, default = list[item], list(default or ())  # type: ignore[valid-type]
    elif optional and inner in (int, float):
        annotation, extra["parser"] = inner, functools.partial(_number_or_none, inner)
        extra["metavar"] = f"{inner.__name__.upper()}|none"
    elif typing.get_origin(inner) is Literal:
        extra["case_sensitive"] = False  # `--log-level INFO` is `info`
    elif inner not in (str, int, float, bool, Path):
        raise TypeError(
            f"field {'.'.join(path)}: no option for type {kind!r}; set metadata cli=False "
            "and give the command an option of its own"
        )
    decls = [f"--{flag}/--no-{flag}"] if inner is bool else [f"--{flag}"]
    info = typer.Option(default, *decls, help=f.metadata["help"], envvar=envvar, rich_help_panel=panel, **extra)
    return Option(
        name, path, inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation)
    )


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return ...  # a required field is a required option


def _unwrap_optional(kind: Any) -> tuple[Any, bool]:
    """(X, True) for `X | None`, (kind, False) otherwise."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return kind, False


def _number_or_none(kind: type, text: Any) -> int | float | None:
    """A number, or None for the word `none` (click parses the default too: that is passed through)."""
    if not isinstance(text, str):
        return text
    if text.strip().lower() == "none":
        return None
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{text!r} is not {'an integer' if kind is int else 'a number'} or none") from None


def _put(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _merge(into: dict[str, Any], layer: Mapping[str, Any]) -> None:
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value


def _build(cls: type, values: Mapping[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        kind, _ = _unwrap_optional(hints[name])
        if isinstance(kind, type) and dataclasses.is_dataclass(kind) and isinstance(value, Mapping):
            value = _build(kind, value)
        elif typing.get_origin(kind) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)
