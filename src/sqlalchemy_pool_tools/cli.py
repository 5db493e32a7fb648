"""The ``sqlalchemy-pool`` command line: one entry point for every tool in this package.

Each sub-command lives in its own module exposing ``register(subparsers)``; the module adds
its parser and ``set_defaults(func=run)`` with ``run(args) -> int``. Modules are imported
one by one, so a tool that cannot be imported (a broken install of one of its dependencies)
is listed with the reason instead of taking the others down.

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

# Sub-command modules in help order.
COMMAND_MODULES: dict[str, str] = {
    "demo": "sqlalchemy_pool_tools.demo.runner",
    "loadtest": "sqlalchemy_pool_tools.loadtest",
    "doctor": "sqlalchemy_pool_tools.doctor.cli",
    "pg-activity": "sqlalchemy_pool_tools.pg_activity_cli",
    "holders": "sqlalchemy_pool_tools.holders_cli",
    "benchmarks": "sqlalchemy_pool_tools.benchmarks_cli",
}


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (plus a --help hint) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


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
    for name, module_name in COMMAND_MODULES.items():
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            # Keep the command listed in --help, with the reason it cannot run.
            _register_unavailable(subparsers, name, f"{module_name}: {type(exc).__name__}: {exc}")
        else:
            module.register(subparsers)
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
