"""``kvsieve methods`` and ``kvsieve tasks``: what can be run, what it measures, and its parameters."""

from __future__ import annotations

import argparse
import dataclasses
import json
import textwrap
from typing import Any

INDENT = " " * 4


def add_parsers(sub) -> None:
    lst = sub.add_parser(
        "methods",
        help="list the methods: papers, what the budget counts, each parameter's meaning and default",
        description="Every registered method and preset: its paper, what its budget counts (entries stored, or "
        "entries a decode step attends), and each parameter with its default and meaning. Presets list the values "
        "they set on top of their method.",
    )
    lst.add_argument("names", nargs="*", metavar="NAME", help="only these methods (default: all)")
    lst.add_argument("--json", action="store_true", help="print one JSON list instead")
    lst.set_defaults(handler=cmd_methods)

    tasks = sub.add_parser(
        "tasks",
        help="list the evaluation tasks: what each measures, its metric and parameters",
        description="The generated tasks `kvsieve eval --tasks` runs (and lm), what each asks and how it is scored, "
        "and the options that --config's task_options can set. Benchmark files come in with --data.",
    )
    tasks.add_argument("--json", action="store_true", help="print one JSON list instead")
    tasks.set_defaults(handler=cmd_tasks)


def _wrap(text: str, indent: str) -> str:
    return textwrap.fill(text, width=118, initial_indent=indent, subsequent_indent=indent + "  ")


def cmd_methods(args: argparse.Namespace) -> int:
    import kvsieve

    infos = kvsieve.methods()
    if args.names:
        for name in args.names:
            kvsieve.method(name)  # an unknown name fails with the closest ones
        infos = [i for i in infos if i.name in args.names]
    if args.json:
        print(json.dumps([dataclasses.asdict(i) for i in infos], default=repr))
        return 0
    for info in infos:
        print(f"{info.name}  [{info.paper}]")
        print(_wrap(info.summary, INDENT))
        print(_wrap("budget: " + (info.budget_counts or "none (every entry is kept and attended)"), INDENT))
        if info.preset_of is not None:
            sets = ", ".join(f"{k}={v!r}" for k, v in info.preset_params.items())
            print(_wrap(f"preset of {info.preset_of} (parameters as there): {sets}", INDENT))
            continue
        width = max((len(f"{k}={v!r}") for k, v in info.params.items()), default=0)
        for key, value in info.params.items():
            shown = f"{key}={value!r}"
            print(_wrap(f"{shown:<{width}}  {info.param_help.get(key, '')}".rstrip(), INDENT))
    return 0


def task_entries() -> list[dict[str, Any]]:
    """The tasks as `kvsieve tasks` lists them (lm last)."""
    from kvsieve.eval.config import EvalConfig
    from kvsieve.eval.metrics import METRICS
    from kvsieve.eval.tasks import TASKS

    entries = []
    for spec in TASKS.values():
        doc = (METRICS[spec.metric].__doc__ or "").strip().splitlines()
        entries.append(
            {
                "name": spec.name,
                "benchmark": spec.benchmark,
                "measures": spec.description,
                "metric": spec.metric,
                "metric_means": doc[0] if doc else "",
                "needle_depths": spec.supports_depth,
                "options": spec.option_defaults,
                "available": spec.available(),
                "unavailable_hint": "" if spec.available() else spec.unavailable_hint,
            }
        )
    entries.append(
        {
            "name": "lm",
            "benchmark": "public-domain text",
            "measures": "language modelling of a long document: the continuation after a context of --lengths tokens",
            "metric": "top1_agreement",
            "metric_means": "share of continuation tokens whose top-1 prediction equals the full cache's; perplexity "
            "and KL(full || method) are reported beside it",
            "needle_depths": False,
            "options": {"lm_continuation": EvalConfig().lm_continuation},
            "available": True,
            "unavailable_hint": "",
        }
    )
    return entries


def cmd_tasks(args: argparse.Namespace) -> int:
    entries = task_entries()
    if args.json:
        print(json.dumps(entries, default=repr))
        return 0
    for e in entries:
        status = "" if e["available"] else f"  (not installed: {e['unavailable_hint']})"
        print(f"{e['name']}  [{e['benchmark']}]{status}")
        print(_wrap(e["measures"] + (" (needle depth: --depths)" if e["needle_depths"] else ""), INDENT))
        print(_wrap(f"metric {e['metric']}: {e['metric_means']}", INDENT))
        if e["options"]:
            print(_wrap("options: " + ", ".join(f"{k}={v!r}" for k, v in e["options"].items()), INDENT))
    return 0
