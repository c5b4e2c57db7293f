"""The ``rba`` command line.

Each sub-command lives in its own module under ``rba_core.commands`` and exposes
``register(subparsers)``, which adds its parser and sets ``handler`` to a function taking the
parsed arguments. Modules keep heavy imports (torch, models) inside the handler so that
``rba --help`` stays instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "rba_core.commands.prepare",
    "rba_core.commands.generate",
    "rba_core.commands.chat",
    "rba_core.commands.synth",
    "rba_core.commands.train",
    "rba_core.commands.eval",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rba",
        description="Reinforced Behavior Alignment for speech LLMs.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("rba: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - user-facing errors end as one clear line
        from rba_core.errors import RbaError

        if isinstance(error, RbaError):
            print(f"rba {args.command}: error: {error}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
