"""``kvsieve demo``: a question about a long built-in document, the full cache beside compressed ones."""

from __future__ import annotations

import argparse

from kvsieve.cli.common import add_model_args, model_device_map, names, parse_budget


def add_parser(sub) -> None:
    from kvsieve.demo import DEFAULT_METHODS

    demo = sub.add_parser(
        "demo", help="answer a question about a long built-in document: the full cache beside compressed ones"
    )
    add_model_args(demo)
    demo.add_argument(
        "--methods",
        type=names,
        default=list(DEFAULT_METHODS),
        help="comma-separated methods shown beside the full cache",
    )
    demo.add_argument(
        "--budget", type=parse_budget, default=0.2, help="KV budget of every method: int tokens or a fraction"
    )
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from kvsieve.demo import run_demo

    device_map = model_device_map(args.device)
    return run_demo(args.model, args.dtype, args.methods, args.budget, args.max_new_tokens, device_map=device_map)
