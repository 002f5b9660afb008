"""``kvsieve bench``: prefill time, decode time per token and KV memory of methods side by side."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvsieve.cli.common import add_model_args, budgets, ints, method_params, names, parse_param


def add_parser(sub) -> None:
    bn = sub.add_parser(
        "bench",
        help="prefill time, decode time per token and KV memory of methods side by side",
        description="Time methods on the same public-domain prompt, interleaved repetition by repetition; ratios to "
        "the reference (the full cache, always run, unless --reference) are taken pair by pair within a repetition. "
        "Prints a table; --json writes it.",
    )
    add_model_args(bn)
    bn.add_argument("--methods", type=names, default=["snapkv"], help="comma-separated method names")
    bn.add_argument("--budgets", type=budgets, default=[0.2], help="comma-separated budgets: ints or fractions")
    bn.add_argument("--param", type=parse_param, action="append", default=[], metavar="METHOD.K=V")
    bn.add_argument("--lengths", type=ints, default=[4096], help="comma-separated prompt lengths in tokens")
    bn.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per run (1: prefill only)")
    bn.add_argument("--repeats", type=int, default=3)
    bn.add_argument("--chunk-size", type=int, default=None, help="prefill this many tokens at a time")
    bn.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    bn.add_argument("--json", default=None, metavar="FILE", help="also write the rows and the machine here")
    bn.add_argument(
        "--reference", default="full", help="the method the ratios compare with (default: full; e.g. infllm-2k)"
    )
    bn.set_defaults(handler=cmd_bench)


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
