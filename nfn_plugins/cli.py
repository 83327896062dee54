"""`nfn-plugins` command line: each subcommand lives in its own module and registers itself here."""

from __future__ import annotations

import argparse
import importlib
import sys

# module path -> it defines `add_parser(subparsers)`; the parser's `func(args)` runs the command
COMMAND_MODULES = (
    "nfn_plugins.demo",
    "nfn_plugins.zoo.cli",
    "nfn_plugins.meta_train",
    "nfn_plugins.predictor_cli",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nfn-plugins", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
