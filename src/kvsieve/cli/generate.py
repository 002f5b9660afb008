"""``kvsieve generate``: one prompt through a compressed cache, streamed or as one JSON object."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvsieve.cli.common import add_method_args, add_model_args, make_method, mib, ms


def add_parser(sub) -> None:
    gen = sub.add_parser("generate", help="generate from a prompt with a compressed KV cache")
    gen.add_argument("prompt_file", nargs="?", help="file holding the prompt (default: standard input)")
    gen.add_argument("--question", help="fed after the compressed prompt as its own chunk (query-agnostic use)")
    add_model_args(gen)
    add_method_args(gen)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--chunk-size", type=int, default=None, help="prefill the prompt this many tokens at a time")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--no-chat", action="store_true", help="do not apply the tokenizer's chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object with the text and statistics")
    gen.set_defaults(handler=cmd_generate)


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
            f"KV {mib(s.kv_bytes)} of {mib(s.kv_bytes_full)}, prefill {s.prefill_s:.2f} s, "
            f"decode {ms(s.decode_s_per_token)}/token]",
            file=sys.stderr,
        )
    return 0
