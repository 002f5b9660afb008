"""Progress bars with an estimate of the time left (tqdm on standard error), shared by ``eval`` and ``bench``."""

from __future__ import annotations

import sys
from typing import Any


class NoBar:
    """What `progress_bar` returns when disabled: the same calls, doing nothing."""

    def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, initial: int, enabled: bool, desc: str, unit: str):
    """A tqdm bar over ``total`` steps (``initial`` already done: a resumed run), with rate and time left."""
    if not enabled:
        return NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True)
