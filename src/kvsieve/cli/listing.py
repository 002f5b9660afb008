"""``kvsieve methods``: what can be run, with its parameters."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    lst = sub.add_parser("methods", help="list the methods, their papers and parameters")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(handler=cmd_methods)


def cmd_methods(args: argparse.Namespace) -> int:
    import kvsieve

    infos = kvsieve.methods()
    if args.json:
        print(json.dumps([{"name": i.name, "summary": i.summary, "paper": i.paper, "params": i.params} for i in infos]))
        return 0
    for info in infos:
        print(f"{info.name:<20} {info.summary}  [{info.paper}]")
        if info.params:
            print(" " * 21 + ", ".join(f"{k}={v!r}" for k, v in info.params.items()))
    return 0
