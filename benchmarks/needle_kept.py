"""Which tokens of a needle's answer survive compression: per answer token, the fraction of (layer, KV head)
pairs whose cache still holds it right after the prompt.

The default model's tokenizer splits numbers into single digits, so a method that keeps some digits of the
needle and drops others answers a wrong number. This diagnostic shows how selective each method's scores are on
one generated sample (query-aware: the question is in the compressed prompt). For RefreshKV it reads the partial
cache, the entries a partial step attends.

    python benchmarks/needle_kept.py --task niah_single_2 --length 2048 --depth 0.5 --budget 0.5
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import kvsieve
from kvsieve.driver import Driver
from kvsieve.eval.tasks import make_task, render


def answer_positions(ids: list[int], answer_ids: list[int]) -> list[int]:
    """Positions of the first occurrence of ``answer_ids`` in ``ids``."""
    for i in range(len(ids) - len(answer_ids) + 1):
        if ids[i : i + len(answer_ids)] == answer_ids:
            return list(range(i, i + len(answer_ids)))
    raise ValueError("the answer's tokens do not occur in the prompt as one run")


@torch.inference_mode()
def kept_fractions(model, ids: list[int], method: kvsieve.Method, positions: list[int]) -> dict:
    driver = Driver.new(model, method, len(ids))
    driver.prefill(ids)
    per_layer = []
    for layer in driver.cache.sieve_layers:
        store = getattr(layer.policy, "partial", None) or getattr(layer.policy, "store", None)
        if store is None:
            continue
        held = store.positions[0]  # [H_kv, stored]
        per_layer.append([(held == p).any(dim=-1).float().mean().item() for p in positions])
    return {
        "per_token": [statistics.mean(layer[j] for layer in per_layer) for j in range(len(positions))],
        "layers_with_all_in_every_head": sum(min(layer) == 1.0 for layer in per_layer),
        "layers": len(per_layer),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="niah_single_2")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--depth", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--methods", nargs="+", default=["snapkv", "pyramidkv", "h2o", "nacl", "refreshkv"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, metavar="FILE", help="write the kept counts here (JSON)")
    parser.add_argument("--json", dest="out", help=argparse.SUPPRESS)  # the old name of --out
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = kvsieve.load_model()
    sample = make_task(args.task, tok, length=args.length, n_samples=1, seed=args.seed, depths=[args.depth])[0]
    rendered = render(sample, 0, tok)
    ids = tok(rendered.context_text + rendered.question_text, add_special_tokens=rendered.add_special_tokens)[
        "input_ids"
    ]
    answer = sample.questions[0].answers[0]
    answer_ids = tok(answer, add_special_tokens=False)["input_ids"]
    positions = answer_positions(ids, answer_ids)
    pieces = [tok.decode([t]) for t in answer_ids]
    print(f"{args.task}, {len(ids)} prompt tokens, answer {answer!r} at tokens {positions[0]}..{positions[-1]}")
    print(f"fraction of (layer, KV head) pairs keeping each answer token at budget {args.budget}:")
    print(f"{'method':<12} " + " ".join(f"{p!r:>6}" for p in pieces) + "  layers keeping all in every head")
    results = {}
    for name in args.methods:
        result = kept_fractions(model, ids, kvsieve.method(name, budget=args.budget), positions)
        results[name] = result
        cells = " ".join(f"{f:>6.2f}" for f in result["per_token"])
        print(f"{name:<12} {cells}  {result['layers_with_all_in_every_head']} / {result['layers']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "answer": answer, "positions": positions, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
