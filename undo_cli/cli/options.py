"""The command line generated from the option groups of `undo_cli.options`.

A command declares which groups it takes; their fields become its options, with the flag, help
and help panel the field declares and its help from `COMMAND_HELP`. A group parameter's
default is the command's defaults: the same group instance the stage function takes as its
own default (`undo_cli.options.defaults`, e.g. `DISTILL`), so that the command line and the
library cannot disagree. The function receives one instance of each group, built from the text
given (a group parses and checks itself when it is built, `options.base.settle`):

    @app.command("distill")
    @with_options("distill", train=TrainConfig, evals=EvalOptions, distill=DistillOptions,
                  exclude=("sam_rho",))
    def distill_command(out: Path = typer.Argument(...), *, train: TrainConfig = DISTILL,
                        evals: EvalOptions, distill: DistillOptions) -> None: ...

(The groups are the function's keyword-only parameters, named as in `with_options`; fields in
`exclude` are not offered and keep the command's default.)
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any

from undo_cli.options import COMMAND_HELP, flag_of
from undo_cli.options.base import settle
from undo_cli.options.paths import declared_reads, existing, plain_paths


def _cli_type(f, hint: Any) -> Any:
    """The type typer parses a field as: text for fields with a `parse` hook (`str`, or
    `list[str]` for a `repeatable` one), else the field's own."""
    if not f.metadata.get("parse"):
        return hint
    return list[str] if f.metadata.get("repeatable") else str


def _is_path(hint: Any) -> bool:
    """Whether a type hint is `Path`, `list[Path]` or an Optional of one."""
    if hint is Path:
        return True
    return any(_is_path(arg) for arg in typing.get_args(hint))


def with_options(command: str, *, exclude: Iterable[str] = (), outputs: Iterable[str] = ("out",),
                 reads: dict[str, Callable[[Any], list[str]]] | None = None,
                 aliases: dict[str, tuple[str, ...]] | None = None,
                 **groups: type) -> Callable[[Callable], Callable]:
    """Decorator: the fields of `groups` become options of `command` (module doc).

    Every path-typed option (a `Path` field or parameter but those named in `outputs`, a field
    declared with `option(reads=...)`, a parameter named in `reads` with the function that
    finds its paths) is one of the command's reads: while the command runs,
    `check_output_path` refuses an OUT containing any that exists (`undo_cli.options.paths`).
    `aliases` gives a field more flags (`{"eval": ("--data",)}`).
    """
    import typer

    exclude, outputs, reads = set(exclude), set(outputs), dict(reads or {})
    aliases = dict(aliases or {})
    helps = COMMAND_HELP.get(command, {})

    def decorate(func: Callable) -> Callable:
        signature = inspect.signature(func)
        hints = typing.get_type_hints(func)
        missing = set(groups) - set(signature.parameters)
        if missing:
            raise TypeError(f"{func.__name__} has no parameter for option groups {missing}")
        own = [p for name, p in signature.parameters.items() if name not in groups]
        # (parameter, its flag, how to find its paths) of every path-typed parameter
        path_params = [(p.name, _param_flag(p), reads.get(p.name, plain_paths)) for p in own
                       if p.name in reads or (p.name not in outputs
                                              and _is_path(hints.get(p.name)))]
        path_fields: dict[str, list[tuple[str, str, Callable]]] = {}
        added: list[inspect.Parameter] = []
        annotations = {p.name: hints[p.name] for p in own if p.name in hints}
        plan: dict[str, list[tuple[str, Any]]] = {}  # group -> (field, internal name)
        parsed: dict[str, set[str]] = {}  # group -> fields with a parse hook
        fixed: dict[str, dict[str, Any]] = {}  # group -> excluded fields' values
        flags: set[str] = set()
        for group, cls in groups.items():
            field_hints = typing.get_type_hints(cls)
            given = signature.parameters[group].default  # the command's defaults, if any
            base = given if isinstance(given, cls) else cls()
            plain = cls()
            plan[group], fixed[group] = [], {}
            parsed[group] = {f.name for f in fields(cls) if f.metadata.get("parse")}
            path_fields[group] = [
                (f.name, flag_of(f), f.metadata.get("reads") or plain_paths)
                for f in fields(cls) if f.metadata.get("reads")
                or (f.name not in outputs and _is_path(field_hints[f.name]))]
            for f in fields(cls):
                default = getattr(base, f.name)
                if f.name in exclude or not f.metadata.get("cli", False):
                    if default != getattr(plain, f.name):  # the command's own default
                        fixed[group][f.name] = default
                    continue
                flag = flag_of(f)
                if flag in flags:
                    raise TypeError(f"{command}: option {flag} declared twice")
                flags.add(flag)
                kind = _cli_type(f, field_hints[f.name])
                if f.metadata.get("parse") and default is not None:
                    default = None  # the field's own default applies when not given
                required = f.metadata.get("required", False)
                if default is None and not required and not isinstance(kind, types.UnionType):
                    kind = kind | None
                decls = [flag, *aliases.get(f.name, ())]
                decls += [f.metadata["short"]] if f.metadata.get("short") else []
                shown = isinstance(default, (int, float, str)) and not isinstance(default, bool)
                if required:
                    default, shown = ..., False
                extra = {"metavar": f.metadata["metavar"]} if f.metadata.get("metavar") else {}
                opt = typer.Option(
                    list(default) if isinstance(default, list) else default, *decls,
                    help=helps.get(f.name, f.metadata.get("help", "")),
                    rich_help_panel=f.metadata.get("panel"), show_default=shown, **extra)
                internal = f"{group}__{f.name}"
                added.append(inspect.Parameter(internal, inspect.Parameter.KEYWORD_ONLY,
                                               default=opt, annotation=kind))
                annotations[internal] = kind
                plan[group].append((f.name, internal))

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            built = {}
            for group, cls in groups.items():
                values = dict(fixed[group])
                for name, internal in plan[group]:
                    value = kwargs.pop(internal)
                    if value is None and name in parsed[group]:
                        continue  # the field's own default applies
                    values[name] = value
                instance = cls(**values)  # parses its text and checks itself
                if not hasattr(cls, "__post_init__"):
                    settle(instance)
                built[group] = instance
            found = [read for name, flag, extract in path_params
                     for read in existing(flag, kwargs.get(name), extract)]
            found += [read for group, entries in path_fields.items()
                      for name, flag, extract in entries
                      for read in existing(flag, getattr(built[group], name), extract)]
            with declared_reads(found):
                return func(*args, **kwargs, **built)

        params = [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD,
                            annotation=hints.get(p.name, p.annotation)) for p in own]
        wrapper.__signature__ = signature.replace(parameters=params + added)
        wrapper.__wrapped_command__ = func  # the command as written (its defaults)
        wrapper.__annotations__ = {**annotations, "return": hints.get("return")}
        del wrapper.__wrapped__  # typer must see the new signature, not the original's
        return wrapper

    return decorate


def _param_flag(p: inspect.Parameter) -> str:
    """The flag of a parameter declared with `typer.Option` (its first `--name`), or the
    parameter's name in capitals for an argument."""
    decls = [d for d in getattr(p.default, "param_decls", None) or () if d.startswith("--")]
    if decls:
        return decls[0]
    if type(p.default).__name__ == "OptionInfo":
        return "--" + p.name.replace("_", "-")
    return getattr(p.default, "metavar", None) or p.name.upper()
