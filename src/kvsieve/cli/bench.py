"""``kvsieve bench``: prefill time, decode time per token and KV memory of methods side by side."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvsieve.cli.common import add_model_args, budgets, ints, method_params, model_device_map, names, parse_param


def add_parser(sub) -> None:
    bn = sub.add_parser(
        "bench",
        help="prefill time, decode time per token and KV memory of methods side by side",
        description="Time methods on the same public-domain prompt, interleaved repetition by repetition; ratios to "
        "the reference (the full cache, always run, unless --reference) are taken pair by pair within a repetition. "
        "Prints a table and warns where repetitions disagree by more than a difference; --out FILE writes the rows "
        "and the machine as JSON, --json prints that JSON instead of the table.",
    )
    add_model_args(bn, dtype="auto")  # the fastest: every table states the dtype it ran in
    bn.add_argument("--methods", type=names, default=["snapkv"], help="comma-separated method names")
    bn.add_argument("--budgets", type=budgets, default=[0.2], help="comma-separated budgets: ints or fractions")
    bn.add_argument(
        "--param", type=parse_param, action="append", default=[], metavar="METHOD.K=V", help="a method parameter"
    )
    bn.add_argument("--lengths", type=ints, default=[4096], help="comma-separated prompt lengths in tokens")
    bn.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per run (1: prefill only)")
    bn.add_argument("--repeats", type=int, default=3, help="repetitions per method (the table gives medians)")
    bn.add_argument(
        "--chunk-size", type=int, default=None, help="prefill this many tokens at a time (default: all at once)"
    )
    bn.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    bn.add_argument("--out", default=None, metavar="FILE", help="also write the rows and the machine here (JSON)")
    bn.add_argument("--json", action="store_true", help="print the JSON record on standard output, not the table")
    # `bench --json FILE` wrote a file before --json meant the same as everywhere else: catch FILE to say so
    bn.add_argument("stray", nargs="?", default=None, help=argparse.SUPPRESS)
    bn.add_argument(
        "--floor",
        action="store_true",
        help="also time the full cache at each method's attended size: the floor its decode step cannot beat",
    )
    bn.add_argument("--no-progress", action="store_true", help="no progress bar")
    bn.add_argument(
        "--reference", default="full", help="the method the ratios compare with (default: full; e.g. infllm-2k)"
    )
    bn.set_defaults(handler=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    import kvsieve
    from kvsieve.bench import bench, bench_runs, format_bench, machine_line, noise_warnings
    from kvsieve.eval.environment import environment

    if args.stray is not None:
        hint = f"; write a file with --out {args.stray}" if args.json else ""
        raise ValueError(f"unexpected argument {args.stray!r}: --json is a flag (JSON on standard output){hint}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    params = method_params(args.param, "bench")
    # every error before the model loads
    bench_runs(args.methods, args.lengths, args.budgets, params, args.new_tokens, args.repeats, args.chunk_size,
               args.reference)  # fmt: skip
    if args.out is not None and Path(args.out).is_dir():
        raise ValueError(f"--out {args.out!r} is a directory: give the JSON file to write, e.g. {args.out}/bench.json")
    device_map = model_device_map(args.device)
    model, tokenizer = kvsieve.load_model(args.model, dtype=args.dtype, device_map=device_map)
    rows = bench(model, tokenizer, args.methods, args.lengths, args.budgets, params, args.new_tokens, args.repeats,
                 args.chunk_size, reference=args.reference, progress=not args.no_progress,
                 floor=args.floor)  # fmt: skip
    env = environment(model)
    warnings = noise_warnings(rows)
    if args.repeats == 1:
        warnings.append("1 repetition: no spread is measured, so no difference is checked against noise (--repeats 3)")
    given = {k: v for k, v in vars(args).items() if k not in ("handler", "stray")}
    record = {"env": env, "args": given, "rows": [r.to_dict() for r in rows], "warnings": warnings}
    if args.json:
        print(json.dumps(record, default=str))
    else:
        print(f"kvsieve bench: {machine_line(env)}; {args.repeats} repetitions, medians")
        print(format_bench(rows))
    for warning in warnings:
        print(f"kvsieve bench: warning: {warning}", file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
    return 0
