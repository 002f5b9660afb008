"""``kvsieve eval`` (a resumable sweep into a run directory) and ``kvsieve report`` (its HTML page)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from kvsieve.cli.common import DEVICE_HELP, budgets, floats, ints, method_params, names, parse_param


def add_parsers(sub) -> None:
    ev = sub.add_parser(
        "eval",
        help="sweep methods x budgets x tasks x lengths into a resumable run directory",
        description="Run (or resume) an evaluation sweep. A YAML --config gives any setting; the options below "
        "override it. The full cache always runs as the reference. Rerun the same command to resume.",
    )
    d = _config_defaults()
    ev.add_argument("--out", required=True, help="run directory (created; resumed if it holds the same config)")
    ev.add_argument("--config", help="YAML file of settings (keys as in kvsieve.eval.config.EvalConfig)")
    ev.add_argument("--model", default=None, help="local HF directory, .gguf file or known alias (default: SmolLM2)")
    ev.add_argument("--dtype", default=None, help=f"float32 | bfloat16 | float16 {d['dtype']}")
    ev.add_argument(
        "--device",
        default=None,
        help=f"{DEVICE_HELP} {d['device']}; not part of the run's identity: a run resumes on another device",
    )
    ev.add_argument("--methods", type=names, help=f"comma-separated method names (full is always run) {d['methods']}")
    ev.add_argument(
        "--budgets", type=budgets, help=f"comma-separated budgets: ints (tokens) or fractions {d['budgets']}"
    )
    ev.add_argument(
        "--tasks", type=names, help=f"comma-separated tasks from `kvsieve tasks` {d['tasks'][:-1]}; none with --data)"
    )
    ev.add_argument(
        "--data",
        action="append",
        default=None,
        metavar="FILE",
        help="a benchmark JSONL file (repeatable); without --tasks only the files run",
    )
    ev.add_argument("--lengths", type=ints, help=f"comma-separated prompt lengths in tokens {d['lengths']}")
    ev.add_argument("--samples", type=int, help=f"samples per task, length and depth {d['samples']}")
    ev.add_argument(
        "--depths", type=floats, help="comma-separated needle depths in [0, 1] (default: random per sample)"
    )
    ev.add_argument("--modes", type=names, help=f"query_aware,query_agnostic {d['modes']}")
    ev.add_argument("--seed", type=int, help=f"seed of the generated samples {d['seed']}")
    ev.add_argument("--chunk-size", type=int, help="prefill prompts this many tokens at a time (default: all at once)")
    ev.add_argument("--max-new-tokens", type=int, help="override every task's own (default: the task's)")
    ev.add_argument("--lm-continuation", type=int, help=f"tokens scored after each lm context {d['lm_continuation']}")
    ev.add_argument(
        "--metric", type=parse_param, action="append", default=[], metavar="TASK=METRIC", help="override a metric"
    )
    ev.add_argument(
        "--param",
        type=parse_param,
        action="append",
        default=[],
        metavar="METHOD.K=V",
        help="a method parameter, e.g. snapkv.window_size=16 (repeatable)",
    )
    ev.add_argument("--no-chat", action="store_true", help="do not apply the tokenizer's chat template")
    ev.add_argument("--no-share-prefill", action="store_true", help="every method runs its own prefill")
    ev.add_argument("--force", action="store_true", help="set aside the rows of a different configuration")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.add_argument(
        "--shard",
        default=None,
        metavar="K/N",
        help="run only shard K of N (units K, K+N, ...) into its own rows file; start N processes (any launcher) "
        "on one --out to split a sweep",
    )
    ev.add_argument(
        "--workers",
        type=int,
        default=None,
        help="split the sweep into this many shards run as Ray tasks (one GPU each when there are GPUs); "
        "RAY_ADDRESS picks a cluster, else a local one is started (pip install 'kvsieve[ray]')",
    )
    ev.set_defaults(handler=cmd_eval)

    rep = sub.add_parser("report", help="write one self-contained HTML page of plots and tables from run directories")
    rep.add_argument("run_dirs", nargs="+", metavar="DIR", help="run directories written by kvsieve eval")
    rep.add_argument("--out", default="report.html", help="the HTML file to write (default: report.html)")
    rep.add_argument("--title", default=None, help="the page's title (default: the run directories' names)")
    rep.add_argument(
        "--markdown", default=None, metavar="FILE", help="also write per-task tables (score and retention by budget)"
    )
    rep.set_defaults(handler=cmd_report)


def _config_defaults() -> dict[str, str]:
    """``(default: X)`` for each `EvalConfig` setting: the options default to None so that a --config file can
    set them, and the help says what applies when neither does."""
    from kvsieve.eval.config import EvalConfig

    shown = {}
    for key, value in vars(EvalConfig()).items():
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        shown[key] = f"(default: {text})"
    return shown


def eval_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line (None: not given), in `EvalConfig`'s terms."""
    params = method_params(args.param, "eval")
    return {
        "model": args.model,
        "dtype": args.dtype,
        "device": args.device,
        "methods": args.methods,
        "budgets": args.budgets,
        "tasks": args.tasks,
        "data": args.data,
        "lengths": args.lengths,
        "samples": args.samples,
        "depths": args.depths,
        "modes": args.modes,
        "seed": args.seed,
        "chunk_size": args.chunk_size,
        "max_new_tokens": args.max_new_tokens,
        "lm_continuation": args.lm_continuation,
        "metrics": {task: str(metric) for task, metric in args.metric} or None,
        "params": params or None,
        "chat": False if args.no_chat else None,
        "share_prefill": False if args.no_share_prefill else None,
    }


def cmd_eval(args: argparse.Namespace) -> int:
    from kvsieve.eval.config import EvalConfig
    from kvsieve.eval.runner import run_eval

    config = EvalConfig.load(args.config, eval_overrides(args))
    if args.workers is not None:
        from kvsieve.eval.distributed import run_eval_ray

        if args.shard is not None:
            raise ValueError("give --workers or --shard, not both")
        run_eval_ray(config, args.out, args.workers, force=args.force)
        return 0
    try:
        run_eval(config, args.out, force=args.force, progress=not args.no_progress, shard=args.shard)
    except KeyboardInterrupt:
        print(f"\nkvsieve eval: interrupted; rerun the same command to resume from {args.out}", file=sys.stderr)
        return 130
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from kvsieve.eval.report import write_report

    path = write_report(args.run_dirs, args.out, title=args.title, markdown=args.markdown)
    print(f"kvsieve report: wrote {path}" + (f" and {args.markdown}" if args.markdown else ""))
    return 0
