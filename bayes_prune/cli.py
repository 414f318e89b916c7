"""Command-line helpers for `train.py`."""

from __future__ import annotations

import re

NUMERIC_CHOICE = re.compile(r"^(sparsity)=(\d+(?:\.\d+)?(?:,\d+(?:\.\d+)?)*)$")


def quote_numeric_choices(argv: list[str]) -> list[str]:
    """`sparsity=25,50` -> `sparsity='25','50'`.

    Hydra parses a bare number as an int, and an int cannot select a config-group option
    ("Config group override must be a string"), yet the sparsity options are named by number.
    """
    out = []
    for arg in argv:
        m = NUMERIC_CHOICE.match(arg)
        out.append(f"{m[1]}=" + ",".join(f"'{v}'" for v in m[2].split(",")) if m else arg)
    return out
