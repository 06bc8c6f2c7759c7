"""argparse `type=` checkers for numeric flags: a value out of range is refused while parsing,
as one `ukgpu CMD: error: argument --flag: ...` line after the usage, instead of a traceback
from deep inside the engine or the server (a port above 65535, a context of 10^8 tokens,
zero slots).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

MAX_CTX = 1 << 20  # tokens; beyond any model the registry knows, and KV memory no VM has


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An integer in [lo, hi] (hi None: no upper bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < lo or (hi is not None and value > hi):
            span = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: give a number {span}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(lo: float, hi: float | None = None, *, above: bool = False) -> Callable[[str], float]:
    """A finite number >= lo (> lo when `above`) and <= hi."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        low_ok = value > lo if above else value >= lo
        if not (low_ok and (hi is None or value <= hi)) or value != value:
            low = f"above {lo:g}" if above else f"at least {lo:g}"
            span = f"{low} and at most {hi:g}" if hi is not None else low
            raise argparse.ArgumentTypeError(f"{text} is out of range: give a number {span}")
        return value

    parse.__name__ = "number"
    return parse


port = int_in(0, 65535)  # 0: any free port
ctx = int_in(2, MAX_CTX)
positive = int_in(1)
non_negative = int_in(0)
seconds = float_in(0.0, above=True)
