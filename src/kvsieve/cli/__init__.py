"""Command line: ``kvsieve generate | methods | tasks | demo | eval | report | bench``, one module per subcommand.

Errors in the user's input (unknown method, bad budget, missing model, unreadable file, ...) print one line and
exit with status 2, without a traceback (set ``KVSIEVE_DEBUG=1`` to see it); Ctrl-C exits with 130 and a short
message, and a closed output pipe (``kvsieve methods | head``) ends quietly.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata

from kvsieve.cli import bench, demo, evaluate, generate, listing
from kvsieve.cli.common import ArgumentParser, make_method, method_params, parse_budget, parse_param

__all__ = ["EXIT_USAGE", "build_parser", "main", "make_method", "method_params", "parse_budget", "parse_param"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what `yes | head` reports


def version_line() -> str:
    """kvsieve's version and the versions it runs on, from the installed metadata (no torch import)."""

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    from kvsieve import __version__

    return (
        f"kvsieve {__version__} (python {sys.version.split()[0]}, torch {version('torch')}, "
        f"transformers {version('transformers')})"
    )


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="kvsieve", description="Long-context inference with a small KV cache.")
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    generate.add_parser(sub)
    listing.add_parsers(sub)
    demo.add_parser(sub)
    evaluate.add_parsers(sub)
    bench.add_parser(sub)
    return parser


def _describe(error: BaseException) -> str:
    """One line: an OSError as 'what: file', anything else as its message."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        return f"{error.strerror}: {str(error.filename)!r}"
    return str(error)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from kvsieve.cache import UnsupportedModelError
    from kvsieve.models import ModelIntegrityError

    user_errors = (ValueError, TypeError, OSError, UnsupportedModelError, ModelIntegrityError, NotImplementedError)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        if os.environ.get("KVSIEVE_DEBUG"):
            raise
        print(f"\nkvsieve {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader left (`| head`): nothing more to say, and Python's own flush at exit must not complain either
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # stdout is not a real file (tests, notebooks)
            pass
        return EXIT_BROKEN_PIPE
    except user_errors as error:
        if os.environ.get("KVSIEVE_DEBUG"):
            raise
        print(f"kvsieve: error: {_describe(error)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
