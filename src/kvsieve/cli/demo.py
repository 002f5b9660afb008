"""``kvsieve demo``: a question about a long built-in document, full vs compressed cache."""

from __future__ import annotations

import argparse

from kvsieve.cli.common import add_method_args, add_model_args, make_method


def add_parser(sub) -> None:
    demo = sub.add_parser("demo", help="answer a question about a long built-in document, full vs compressed cache")
    add_model_args(demo)
    add_method_args(demo, default_method="snapkv", default_budget=0.2)
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from kvsieve.demo import run_demo

    return run_demo(args.model, args.dtype, make_method(args), args.max_new_tokens)
