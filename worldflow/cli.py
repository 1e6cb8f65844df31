"""The `worldflow` command line: the one file that may reach the library, envs and agents.

Each subcommand imports what it needs inside its handler, so `worldflow --help` stays fast.
"""

import argparse
import sys

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="worldflow", description="WorldFlow: a learned simulator "
                                     "built on autoregressive normalizing flows.")
    parser.add_argument("--version", action="version", version=f"worldflow {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.handler(args) or 0


if __name__ == "__main__":
    sys.exit(main())
