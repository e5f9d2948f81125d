"""The `undo` application: `app` (the root command and its options), how every failure becomes
one line and an exit code, and `main`. The commands, one module each in this package, import
`app` from here and register themselves on it (`undo_cli.cli` imports them all).

Errors raised as `UndoError` become one line on stderr and the exit code of the error class
(see `undo_cli.errors`); any other exception becomes one line too, unless `--debug` is given.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from typer.core import TyperGroup

try:  # typer >= 0.20 vendors click
    from typer._click.exceptions import NoArgsIsHelpError
    from typer._click.exceptions import UsageError as ClickUsageError
except ImportError:  # pragma: no cover - older typer on top of click
    from click.exceptions import UsageError as ClickUsageError

    NoArgsIsHelpError = ()

from undo_cli import __version__
from undo_cli.cli.options import with_options
from undo_cli.console import one_line
from undo_cli.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, EXIT_USAGE, UndoError, UsageError
from undo_cli.options.commands import RootOptions

_ENV_DEBUG = os.environ.get("UNDO_DEBUG", "") not in ("", "0")
_state = {"debug": _ENV_DEBUG, "finished": False}


def _conventional_help() -> None:
    """Help as click and most command lines show it: `OUT`, not typer 0.2x's `{OUT}`, for a
    required argument in the usage line, flags without a `<bool>` type, and a repeated
    argument's element type (`CKPT... <path>`), not typer's `<list[Path]>`."""
    from typer import core

    usage = getattr(core.TyperArgument, "_usage_display_name", None)
    if usage is not None:
        def plain_usage(self) -> str:
            return usage(self).replace("{", "").replace("}", "")

        core.TyperArgument._usage_display_name = plain_usage
    display = getattr(core.TyperOption, "display_type_rich", None)
    if display is not None:
        def no_bool_type(self, ctx):
            return None if getattr(self, "is_flag", False) else display(self, ctx)

        core.TyperOption.display_type_rich = no_bool_type
    shown = getattr(core.TyperArgument, "display_type_rich", None)
    if shown is not None:
        def element_type(self, ctx):  # CKPT... <path>, not <list[Path]>
            text = shown(self, ctx)
            if isinstance(text, str) and text.startswith("<list[") and text.endswith("]>"):
                return f"<{text[6:-2].lower()}>"
            return text

        core.TyperArgument.display_type_rich = element_type


_conventional_help()


def debug_enabled() -> bool:
    """Whether this command runs with `undo --debug` (or UNDO_DEBUG=1)."""
    return bool(_state["debug"])


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(code)


class UndoGroup(TyperGroup):
    """Click group that turns every failure into `error: ...` plus an exit code.

    Each command runs in a `command_scope` (its output lock is released when it ends). An
    interruption (Ctrl-C, SIGTERM) exits 130 with nothing written, unless the output was
    already complete and in place: then the command has done its work, says so, and exits 0
    (130 still for a command whose gates come after its output: they were not checked).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from undo_cli.cli.helptext import reflow_commands

        reflow_commands(self)  # paragraphs wrap to the terminal, lists keep their lines

    def parse_args(self, ctx, args):
        try:  # the root's own options (--threads ...); a subcommand's are parsed in invoke
            return super().parse_args(ctx, args)
        except NoArgsIsHelpError:
            raise
        except ClickUsageError as e:
            _fail(f"{e.format_message()} (see 'undo --help')", EXIT_USAGE)

    def invoke(self, ctx):
        from undo_cli.checkpoint.lock import command_scope, committed_outputs

        _state["finished"] = False
        try:
            debug = _ENV_DEBUG or bool(ctx.params.get("root__debug"))  # RootOptions.debug
            with command_scope(), _warnings_shown(debug):
                result = super().invoke(ctx)
            _state["finished"] = True
            return result
        except (typer.Exit, typer.Abort, NoArgsIsHelpError):
            raise
        except ClickUsageError as e:
            sub = e.ctx.command_path if e.ctx is not None else "undo"
            _fail(f"{e.format_message()} (see '{sub} --help')", EXIT_USAGE)
        except UndoError as e:
            if _state["debug"]:
                raise
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            written = committed_outputs()
            if written and ctx.invoked_subcommand in GATES_AFTER_WRITING:
                _fail(f"interrupted after {written[-1]} was written (it is complete); its "
                      "--fail-if gates were not checked", EXIT_INTERRUPTED)
            if written:
                _state["finished"] = True
                typer.echo(one_line(f"note: interrupted after {written[-1]} was written (it "
                                    "is complete)"), err=True)
                raise typer.Exit(0) from None
            _fail("interrupted; nothing was written", EXIT_INTERRUPTED)
        except RecursionError:
            if _state["debug"]:
                raise
            _fail("an input is nested too deeply to process (RecursionError); run "
                  "'undo --debug ...' for the traceback", EXIT_USAGE)
        except Exception as e:  # noqa: BLE001 - the last line of defence for users
            if _state["debug"]:
                raise
            _fail(f"{type(e).__name__}: {e} (run 'undo --debug ...' for the traceback)",
                  EXIT_RUNTIME)


@contextmanager
def _warnings_shown(debug: bool) -> Iterator[None]:
    """Python warnings (torch, numpy, transformers) reach stderr only with --debug: without
    it a command prints its own notes and one line per error, nothing else."""
    if debug:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


app = typer.Typer(
    cls=UndoGroup,
    name="undo",
    help="UNDO: make capability removal in language models robust "
    "(Unlearn, Noise, Distill-on-Outputs; arXiv 2506.06278).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"undo {__version__}")
        raise typer.Exit()


# Commands whose --fail-if gates are checked after their output is written: an interruption
# there is not a success.
GATES_AFTER_WRITING = ("relearn-attack",)

# Commands that run data-parallel under `accelerate launch` / torchrun; the others would
# have every process write the same output, so they refuse a multi-process launch.
SCALES_OUT = ("train", "unlearn", "distill", "relearn-attack")


def refuse_launch(what: str) -> None:
    """`UsageError` if started by a multi-process launcher (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError(f"{what} runs in one process (docs/scale-out.md): start it without "
                         "`accelerate launch` / torchrun")


@app.callback()
@with_options("root", root=RootOptions)
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(  # eager: answered before anything else is parsed
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    *,
    root: RootOptions,
) -> None:
    """UNDO: make capability removal in language models robust."""
    _state["debug"] = _ENV_DEBUG or root.debug  # per command (several may run in one process)
    if root.threads is not None:
        from undo_cli.runtime import set_threads

        set_threads(root.threads)
    if ctx.invoked_subcommand and ctx.invoked_subcommand not in SCALES_OUT:
        refuse_launch(f"undo {ctx.invoked_subcommand}")
    from undo_cli.cli.common import show_output

    show_output(quiet=False)  # the library's notes on stderr (a command's --quiet narrows it)


def _interrupt(signum, frame) -> None:  # noqa: ARG001
    # Ctrl-C and SIGTERM unwind the command, so atomic outputs delete their temporary
    # directories; once the command has finished, they are too late to change anything.
    if not _state["finished"]:
        raise KeyboardInterrupt


def main() -> None:
    """Console entry point (`undo`)."""
    import signal

    from undo_cli.runtime import quiet_libraries

    # Idle OpenMP threads sleep instead of spinning (read when torch loads, so before any
    # command imports it): spinning threads collapse once other work shares the cores
    # (docs/benchmarks.md, "thread settings"). An explicit OMP_WAIT_POLICY wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    if not _state["debug"] and "--debug" not in sys.argv[1:]:
        warnings.simplefilter("ignore")  # also while libraries are imported
    try:
        quiet_libraries()
        app(prog_name="undo")
    except KeyboardInterrupt:  # before a command started (e.g. while importing libraries)
        typer.echo("error: interrupted; nothing was written", err=True)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Tear down the process group a multi-process launch set up (without it NCCL warns at
    exit, and gloo can abort while a slower process still closes its connections)."""
    dist = sys.modules.get("torch.distributed")  # never imports torch itself
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
