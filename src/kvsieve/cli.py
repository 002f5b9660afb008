"""Command line: ``kvsieve generate | methods | demo | eval | report | bench``.

Errors in the user's input (unknown method, bad budget, missing model, ...) print one line and exit with status 2,
without a traceback (set ``KVSIEVE_DEBUG=1`` to see it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

EXIT_USAGE = 2


def parse_budget(text: str) -> int | float:
    """``"256"`` -> 256 tokens; ``"0.2"`` -> a fifth of the prompt."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"budget must be an int (tokens) or a fraction in (0, 1], got {text!r}"
        ) from None


def parse_param(text: str) -> tuple[str, Any]:
    """``k=v`` with ``v`` read as YAML (numbers, booleans, lists, strings)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param expects key=value, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvsieve", description="Long-context inference with a small KV cache.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate from a prompt with a compressed KV cache")
    gen.add_argument("prompt_file", nargs="?", help="file holding the prompt (default: standard input)")
    gen.add_argument("--question", help="fed after the compressed prompt as its own chunk (query-agnostic use)")
    _add_model_args(gen)
    _add_method_args(gen)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--chunk-size", type=int, default=None, help="prefill the prompt this many tokens at a time")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--no-chat", action="store_true", help="do not apply the tokenizer's chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object with the text and statistics")

    lst = sub.add_parser("methods", help="list the methods, their papers and parameters")
    lst.add_argument("--json", action="store_true")

    demo = sub.add_parser("demo", help="answer a question about a long built-in document, full vs compressed cache")
    _add_model_args(demo)
    _add_method_args(demo, default_method="snapkv", default_budget=0.2)
    demo.add_argument("--max-new-tokens", type=int, default=24)

    ev = sub.add_parser(
        "eval",
        help="sweep methods x budgets x tasks x lengths into a resumable run directory",
        description="Run (or resume) an evaluation sweep. A YAML --config gives any setting; the options below "
        "override it. The full cache always runs as the reference. Rerun the same command to resume.",
    )
    ev.add_argument("--out", required=True, help="run directory (created; resumed if it holds the same config)")
    ev.add_argument("--config", help="YAML file of settings (keys as in kvsieve.eval.config.EvalConfig)")
    ev.add_argument("--model", default=None, help="local HF directory, .gguf file or known alias (default: SmolLM2)")
    ev.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    ev.add_argument("--methods", type=_names, help="comma-separated method names (full is always run)")
    ev.add_argument("--budgets", type=_budgets, help="comma-separated budgets: ints (tokens) or fractions")
    ev.add_argument("--tasks", type=_names, help="comma-separated tasks, e.g. passkey,niah_single_2,lm")
    ev.add_argument("--data", action="append", default=None, metavar="FILE", help="a benchmark JSONL file (repeatable)")
    ev.add_argument("--lengths", type=_ints, help="comma-separated prompt lengths in tokens")
    ev.add_argument("--samples", type=int, help="samples per task, length and depth")
    ev.add_argument("--depths", type=_floats, help="comma-separated needle depths in [0, 1]")
    ev.add_argument("--modes", type=_names, help="query_aware,query_agnostic")
    ev.add_argument("--seed", type=int)
    ev.add_argument("--chunk-size", type=int, help="prefill prompts this many tokens at a time")
    ev.add_argument("--max-new-tokens", type=int, help="override every task's own")
    ev.add_argument("--lm-continuation", type=int, help="tokens scored after each lm context")
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

    bn = sub.add_parser(
        "bench",
        help="prefill time, decode time per token and KV memory of methods side by side",
        description="Time methods on the same public-domain prompt, interleaved repetition by repetition; ratios to "
        "the reference (the full cache, always run, unless --reference) are taken pair by pair within a repetition. "
        "Prints a table; --json writes it.",
    )
    _add_model_args(bn)
    bn.add_argument("--methods", type=_names, default=["snapkv"], help="comma-separated method names")
    bn.add_argument("--budgets", type=_budgets, default=[0.2], help="comma-separated budgets: ints or fractions")
    bn.add_argument("--param", type=parse_param, action="append", default=[], metavar="METHOD.K=V")
    bn.add_argument("--lengths", type=_ints, default=[4096], help="comma-separated prompt lengths in tokens")
    bn.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per run (1: prefill only)")
    bn.add_argument("--repeats", type=int, default=3)
    bn.add_argument("--chunk-size", type=int, default=None, help="prefill this many tokens at a time")
    bn.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    bn.add_argument("--json", default=None, metavar="FILE", help="also write the rows and the machine here")
    bn.add_argument(
        "--reference", default="full", help="the method the ratios compare with (default: full; e.g. infllm-2k)"
    )

    rep = sub.add_parser("report", help="write one self-contained HTML page of plots and tables from run directories")
    rep.add_argument("run_dirs", nargs="+", metavar="DIR", help="run directories written by kvsieve eval")
    rep.add_argument("--out", default="report.html", help="the HTML file to write (default: report.html)")
    rep.add_argument("--title", default=None)
    rep.add_argument(
        "--markdown", default=None, metavar="FILE", help="also write per-task tables (score and retention by budget)"
    )
    return parser


def _split(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def _names(text: str) -> list[str]:
    return _split(text)


def _budgets(text: str) -> list[int | float]:
    return [parse_budget(item) for item in _split(text)]


def _ints(text: str) -> list[int]:
    try:
        return [int(item) for item in _split(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(item) for item in _split(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="local HF directory, .gguf file or known alias (default: SmolLM2)"
    )
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")


def _add_method_args(parser, default_method: str = "full", default_budget: float | None = None) -> None:
    parser.add_argument("--method", default=default_method, help="a name from `kvsieve methods`")
    parser.add_argument(
        "--budget",
        type=parse_budget,
        default=default_budget,
        help="KV entries per layer and head: int tokens or a fraction of the prompt",
    )
    parser.add_argument(
        "--param", type=parse_param, action="append", default=[], metavar="K=V", help="a method parameter, repeatable"
    )


def make_method(args: argparse.Namespace):
    import kvsieve

    params = dict(args.param)
    if args.budget is not None:
        params["budget"] = args.budget
    return kvsieve.method(args.method, **params)


def cmd_generate(args: argparse.Namespace) -> int:
    import kvsieve

    method = make_method(args)  # validate before the slow model load
    prompt = Path(args.prompt_file).read_text(encoding="utf-8") if args.prompt_file else sys.stdin.read()
    if not prompt.strip():
        raise ValueError("prompt is empty (give a prompt file or pipe text to standard input)")
    model, tokenizer = kvsieve.load_model(args.model, dtype=args.dtype)

    def stream(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    out = kvsieve.generate(
        model,
        tokenizer,
        prompt,
        method=method,
        max_new_tokens=args.max_new_tokens,
        question=args.question,
        chunk_size=args.chunk_size,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stream=None if args.json else stream,
        chat=False if args.no_chat else None,
    )
    s = out.stats
    if args.json:
        record = {
            "text": out.text,
            "method": s.method,
            "budget": s.budget,
            "params": method.params(),
            "prompt_tokens": s.prompt_tokens,
            "question_tokens": s.question_tokens,
            "new_tokens": s.new_tokens,
            "kv_stored_tokens": s.kv_stored_tokens,
            "kv_bytes": s.kv_bytes,
            "kv_bytes_full": s.kv_bytes_full,
            "prefill_s": s.prefill_s,
            "decode_s_per_token": s.decode_s_per_token,
            "tokens": out.tokens,
            "kv_stored_tokens_per_layer": s.kv_stored_tokens_per_layer,
        }
        print(json.dumps(record))
    else:
        print()
        print(
            f"[{s.method}: {s.prompt_tokens} prompt tokens, {s.kv_stored_tokens:.0f} KV entries/layer/head, "
            f"KV {_mib(s.kv_bytes)} of {_mib(s.kv_bytes_full)}, prefill {s.prefill_s:.2f} s, "
            f"decode {_ms(s.decode_s_per_token)}/token]",
            file=sys.stderr,
        )
    return 0


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


def cmd_demo(args: argparse.Namespace) -> int:
    from kvsieve.demo import run_demo

    return run_demo(args.model, args.dtype, make_method(args), args.max_new_tokens)


def method_params(pairs: list[tuple[str, Any]], command: str) -> dict[str, dict[str, Any]]:
    """``--param METHOD.KEY=VALUE`` pairs as ``{method: {key: value}}``."""
    params: dict[str, dict[str, Any]] = {}
    for key, value in pairs:
        method_name, dot, name = key.partition(".")
        if not dot or not method_name or not name:
            raise ValueError(
                f"--param for {command} expects METHOD.KEY=VALUE (e.g. snapkv.window_size=16), got {key!r}"
            )
        params.setdefault(method_name, {})[name] = value
    return params


def eval_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line (None: not given), in `EvalConfig`'s terms."""
    params = method_params(args.param, "eval")
    return {
        "model": args.model,
        "dtype": args.dtype,
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


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    import kvsieve
    from kvsieve.bench import bench, bench_runs, format_bench, machine_line
    from kvsieve.eval.runner import environment

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    params = method_params(args.param, "bench")
    # every error before the model loads
    bench_runs(args.methods, args.lengths, args.budgets, params, args.new_tokens, args.repeats, args.chunk_size,
               args.reference)  # fmt: skip
    model, tokenizer = kvsieve.load_model(args.model, dtype=args.dtype)

    def progress(label: str) -> None:
        print(f"kvsieve bench: {label}", file=sys.stderr, flush=True)

    rows = bench(model, tokenizer, args.methods, args.lengths, args.budgets, params, args.new_tokens, args.repeats,
                 args.chunk_size, on_run=progress, reference=args.reference)  # fmt: skip
    env = environment(model)
    print(f"kvsieve bench: {machine_line(env)}; {args.repeats} repetitions, medians")
    print(format_bench(rows))
    if args.json:
        record = {"env": env, "args": vars(args), "rows": [r.to_dict() for r in rows]}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from kvsieve.cache import UnsupportedModelError

    handlers = {
        "generate": cmd_generate,
        "methods": cmd_methods,
        "demo": cmd_demo,
        "eval": cmd_eval,
        "report": cmd_report,
        "bench": cmd_bench,
    }
    try:
        return handlers[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, UnsupportedModelError, NotImplementedError) as error:
        if os.environ.get("KVSIEVE_DEBUG"):
            raise
        print(f"kvsieve: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
