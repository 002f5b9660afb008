"""``kvsieve generate``: one prompt through a compressed cache, streamed or as one JSON object."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kvsieve.cli.common import add_method_args, add_model_args, make_method, mib, model_device_map, ms


def add_parser(sub) -> None:
    gen = sub.add_parser(
        "generate",
        help="generate from a prompt with a compressed KV cache",
        description="Generate from the prompt in PROMPT_FILE (or piped to standard input) with --method's cache. "
        "The text streams to standard output and the statistics to standard error; --json prints one JSON object.",
    )
    gen.add_argument(
        "prompt_file", nargs="?", help="UTF-8 text file holding the prompt; '-' or none: standard input (piped)"
    )
    gen.add_argument(
        "--question",
        action="append",
        help="fed after the compressed prompt as its own chunk (query-agnostic use); repeat it to compress the "
        "prompt once and answer each question from a copy (one answer, and with --json one line, per question)",
    )
    add_model_args(gen)
    add_method_args(gen)
    gen.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many generated tokens")
    gen.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="prefill the prompt this many tokens at a time (default: all at once)",
    )
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's probability mass (temperature > 0)")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed (temperature > 0; default: unseeded)")
    gen.add_argument("--no-chat", action="store_true", help="do not apply the tokenizer's chat template")
    gen.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: the text, statistics, model, dtype, device and why generation stopped",
    )
    gen.set_defaults(handler=cmd_generate)


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{where} is not UTF-8 text (byte {data[error.start]:#04x} at offset {error.start}); convert it first, "
            "e.g. iconv -f latin1 -t utf-8"
        ) from None


def read_prompt(path: str | None) -> str:
    """The prompt from ``path``, or from standard input when it is None or ``-`` (refused at a terminal, where a
    read would wait silently for text nobody knows to type)."""
    if path is None or path == "-":
        stdin = sys.stdin
        if stdin is None or stdin.isatty():
            raise ValueError(
                "no prompt: give a prompt file (kvsieve generate FILE) or pipe one to standard input "
                "(kvsieve generate < FILE); standard input is a terminal, so kvsieve does not wait on it"
            )
        buffer = getattr(stdin, "buffer", None)
        return _decode(buffer.read(), "standard input") if buffer is not None else stdin.read()
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"prompt_file {path!r} is a directory: give a text file holding the prompt")
    if not file.exists():
        raise FileNotFoundError(f"prompt_file {path!r} not found")
    return _decode(file.read_bytes(), f"prompt_file {path!r}")


def budget_notes(method, prompt_tokens: int) -> list[str]:
    """What the user should know about the budget they gave: one that covers the whole prompt evicts nothing."""
    budget = getattr(method, "budget", None)
    if budget is None or isinstance(budget, bool):
        return []
    covers = budget >= prompt_tokens if isinstance(budget, int) else budget >= 1.0
    if not covers:
        return []
    given = f"budget {budget}" + (" (the whole prompt)" if isinstance(budget, float) else "")
    return [
        f"{given} >= the prompt's {prompt_tokens} tokens: nothing of the prompt is evicted, so {method.name} "
        "keeps what the full cache keeps; give a smaller --budget (e.g. 0.2, a fifth of the prompt) to compress"
    ]


def cmd_generate(args: argparse.Namespace) -> int:
    import kvsieve

    method = make_method(args)  # validate before the slow model load
    device_map = model_device_map(args.device)
    prompt = read_prompt(args.prompt_file)
    if not prompt.strip():
        raise ValueError("prompt is empty (give a prompt file or pipe text to standard input)")
    model, tokenizer = kvsieve.load_model(args.model, dtype=args.dtype, device_map=device_map)

    def stream(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    questions = args.question or [None]
    chat = False if args.no_chat else None
    if len(questions) == 1:
        answers = [
            lambda streamer: kvsieve.generate(
                model,
                tokenizer,
                prompt,
                method=method,
                question=questions[0],
                chunk_size=args.chunk_size,
                stream=streamer,
                chat=chat,
                **sampling,
            )
        ]
    else:  # one prefill and compression, then each question on a copy
        context = kvsieve.compress(model, tokenizer, prompt, method, chunk_size=args.chunk_size, chat=chat)
        answers = [lambda streamer, q=q: context.generate(q, stream=streamer, **sampling) for q in questions]
    for number, (question, answer) in enumerate(zip(questions, answers), start=1):
        if len(questions) > 1 and not args.json:
            print(f"[question {number} of {len(questions)}: {question}]", file=sys.stderr, flush=True)
        report(args, model, method, answer(None if args.json else stream), question)
    return 0


def report(args: argparse.Namespace, model, method, out, question: str | None) -> None:
    """One answer's end: its notes and statistics (standard error), or its JSON line."""
    from kvsieve.models import DEFAULT_MODEL

    s = out.stats
    notes = budget_notes(method, s.prompt_tokens)
    if not args.json:
        print(flush=True)  # end the streamed text's line before anything goes to standard error
    for note in notes:
        print(f"kvsieve: note: {note}", file=sys.stderr)
    if args.json:
        weights = next(model.parameters())
        record: dict[str, Any] = {
            "text": out.text,
            "method": s.method,
            "budget": s.budget,
            "params": method.params(),
            "model": args.model or DEFAULT_MODEL,
            "model_path": getattr(model.config, "_name_or_path", None),
            "dtype": str(weights.dtype).removeprefix("torch."),
            "device": str(weights.device),
            "stop_reason": out.stop_reason,
            "question": question,
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
            "notes": notes,
        }
        print(json.dumps(record))
    else:
        stopped = "end of sequence" if out.stop_reason == "eos" else f"--max-new-tokens {args.max_new_tokens}"
        print(
            f"[{s.method}: {s.prompt_tokens} prompt tokens, {s.kv_stored_tokens:.0f} KV entries/layer/head, "
            f"KV {mib(s.kv_bytes)} of {mib(s.kv_bytes_full)}, prefill {s.prefill_s:.2f} s, "
            f"decode {ms(s.decode_s_per_token)}/token, {s.new_tokens} tokens, stopped at {stopped}]",
            file=sys.stderr,
        )
