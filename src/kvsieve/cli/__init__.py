"""Command line: ``kvsieve generate | methods | demo | eval | report | bench``, one module per subcommand.

Errors in the user's input (unknown method, bad budget, missing model, ...) print one line and exit with status 2,
without a traceback (set ``KVSIEVE_DEBUG=1`` to see it).
"""

from __future__ import annotations

import argparse
import os
import sys

from kvsieve.cli import bench, demo, evaluate, generate, listing
from kvsieve.cli.common import make_method, method_params, parse_budget, parse_param

__all__ = ["EXIT_USAGE", "build_parser", "main", "make_method", "method_params", "parse_budget", "parse_param"]

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvsieve", description="Long-context inference with a small KV cache.")
    sub = parser.add_subparsers(dest="command", required=True)
    generate.add_parser(sub)
    listing.add_parser(sub)
    demo.add_parser(sub)
    evaluate.add_parsers(sub)
    bench.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from kvsieve.cache import UnsupportedModelError

    try:
        return args.handler(args)
    except (ValueError, TypeError, FileNotFoundError, UnsupportedModelError, NotImplementedError) as error:
        if os.environ.get("KVSIEVE_DEBUG"):
            raise
        print(f"kvsieve: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
