"""The ``sqlalchemy-pool`` command line: one entry point for every tool in this package.

Each sub-command lives in its own module exposing ``register(subparsers)``; the module adds
its parser and ``set_defaults(func=run)`` with ``run(args) -> int``. Modules are imported
one by one and guarded, so a missing or broken optional tool never takes the others down.

Exit codes: 0 success, 1 the tool found a problem (its own choice), 2 bad input or an
unreachable dependency (one line on stderr, never a traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from sqlalchemy_pool_tools.errors import UserError

PROG = "sqlalchemy-pool"

# Sub-command modules in help order: command name -> candidate modules (the first that
# imports wins).
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "demo": ("sqlalchemy_pool_tools.demo.runner",),
    "loadtest": ("sqlalchemy_pool_tools.loadtest",),
    "doctor": ("sqlalchemy_pool_tools.doctor.cli",),
    "pg-activity": ("sqlalchemy_pool_tools.pg_activity_cli",),
    "holders": ("sqlalchemy_pool_tools.holders_cli",),
    "benchmarks": ("sqlalchemy_pool_tools.benchmarks_cli",),
}


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (plus a --help hint) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _import_first(candidates: Sequence[str]) -> tuple[object | None, str | None]:
    """The first importable module among ``candidates`` and, if one exists but is broken,
    why it failed. A module that simply is not there is not an error."""
    problem: str | None = None
    for name in candidates:
        try:
            return importlib.import_module(name), None
        except ModuleNotFoundError as exc:
            # Only "this very module (or its package) does not exist" is silent; a missing
            # dependency *inside* an existing module is worth reporting.
            if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
                continue
            problem = f"{name}: {exc}"
        except Exception as exc:  # a broken tool must not break the whole CLI
            problem = f"{name}: {type(exc).__name__}: {exc}"
    return None, problem


def _register_unavailable(subparsers: argparse._SubParsersAction, name: str, why: str) -> None:
    """A placeholder sub-command that explains why the real one could not be loaded."""
    parser = subparsers.add_parser(name, help=f"(unavailable: {why})", add_help=False)
    parser.add_argument("rest", nargs=argparse.REMAINDER)

    def run(_args: argparse.Namespace) -> int:
        raise UserError(f"the '{name}' command is unavailable: {why}")

    parser.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Diagnose SQLAlchemy connection-pool exhaustion: demo, load test, doctor, "
        "pg_stat_activity, holders and benchmarks.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, candidates in COMMAND_MODULES.items():
        module, problem = _import_first(candidates)
        register = getattr(module, "register", None)
        if callable(register):
            register(subparsers)
        elif problem is not None:
            # Keep the command listed in --help, with the reason it cannot run.
            _register_unavailable(subparsers, name, problem)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (the console script passes it to ``sys.exit``)."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        func = getattr(args, "func", None)
        if func is None:
            parser.print_help(sys.stderr)
            return 2
        return int(func(args) or 0)
    except UserError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # argparse (--help, bad flags) and tools calling sys.exit
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 2)
    except BrokenPipeError:
        # `sqlalchemy-pool ... | head`: the reader went away. Point stdout at /dev/null so
        # the interpreter's final flush does not raise a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
