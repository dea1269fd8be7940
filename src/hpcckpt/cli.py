"""The ``hpcckpt`` command: ``hpcckpt run | info | verify | export | restore | bench``.

Each subcommand parses its own options, so ``hpcckpt run --help`` shows those of ``run``.

Example::

    $ hpcckpt run -n 4 -- python -m hpcckpt.demo
    $ hpcckpt info demo
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

COMMANDS = {
    "run": "run an MPI job under mpiexec and relaunch it after a failure",
    "info": "show heaps and exports: epochs, objects, sizes",
    "verify": "check the checksums of a heap or an export",
    "export": "export the last committed epoch of a job's heaps to HDF5 (offline)",
    "restore": "lay out heaps for M ranks from an export, ahead of a job",
    "bench": "measure checkpoint cost per tracker",
    "rm": "remove a job's heaps (refused while the job runs, or for a file that is not a heap)",
}


def handler(command: str) -> Callable[[list[str]], int]:
    """The function behind a subcommand; heap commands live in ``hpcckpt._cli_heap``."""
    if command == "run":
        from hpcckpt.run import main as run
        return run
    try:
        module = importlib.import_module("hpcckpt._cli_export" if command in ("export", "restore")
                                         else "hpcckpt._cli_heap")
    except ModuleNotFoundError as e:
        if e.name != "hpcckpt._cli_heap":
            raise
        raise SystemExit(f"hpcckpt {command}: not available in this build; reinstall hpcckpt") from e
    return getattr(module, command)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hpcckpt", description="Fine-grained checkpoints for MPI programs.",
                                epilog="Every command takes --json (one JSON document on stdout) and --help.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="command", required=True)
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to a subcommand; returns its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--version"]:
        from hpcckpt import __version__

        print(f"hpcckpt {__version__}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        parser().parse_args(argv[:1])  # prints usage or help and exits
    from hpcckpt.errors import HeapError

    try:
        return handler(argv[0])(argv[1:])
    except (HeapError, OSError) as e:   # bad input or a damaged file: one line, no traceback
        print(f"hpcckpt {argv[0]}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"hpcckpt {argv[0]}: interrupted", file=sys.stderr)
        return 130
