"""The ``islet-imaging`` command line.

Each subcommand lives beside the code it drives, in a module exposing ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Those modules import heavy libraries (torch)
inside ``run`` only, so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from islet_imaging import __version__
from islet_imaging.errors import InputError

__all__ = ["build_parser", "main"]

#: subcommand → module implementing it, in the order ``--help`` lists them.
COMMANDS: dict[str, str] = {
    "score": "islet_imaging.measure._cli",
    "segment": "islet_imaging.models._cli",
    "synth": "islet_imaging.synth._cli",
    "train": "islet_imaging.train",
    "evaluate": "islet_imaging.evaluate",
    "stages": "islet_imaging._stages_cli",
    "info": "islet_imaging.io._cli",
}

log = logging.getLogger("islet_imaging")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="islet-imaging",
        description="Segment, measure and score microscopy of iPSC → SC-islet differentiation.",
    )
    parser.add_argument("--version", action="version", version=f"islet-imaging {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # subcommand not built yet
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for bad input, 1 for other failures)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    _setup_logging(args.verbose, args.quiet)
    try:
        return int(args._module.run(args) or 0)
    except InputError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
