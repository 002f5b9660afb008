"""``python -m kvsieve.lm_eval_harness`` / ``kvsieve-lm-eval``: lm-eval's own command line, ``kvsieve`` registered.

Every argument goes to lm-eval unchanged (``run``, ``ls tasks``, ``validate``, or the legacy form without a
subcommand). kvsieve's own errors (bad model_args, a refused request, a missing model) print one line and exit with
status 2; ``KVSIEVE_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from kvsieve.lm_eval_harness import KVSieveLMError  # registers --model kvsieve
    except ImportError as error:
        print(f"kvsieve lm-eval: error: {error}", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]  # lm-eval reads sys.argv itself
    try:
        cli_evaluate()
    except KVSieveLMError as error:
        if os.environ.get("KVSIEVE_DEBUG"):
            raise
        print(f"kvsieve lm-eval: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvsieve lm-eval: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
