"""Did-you-mean hints for misspelled keys, values and names."""

from __future__ import annotations

import difflib


def suggest(word: str, choices: list[str]) -> str:
    """`; did you mean 'x'?` or an empty string."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
