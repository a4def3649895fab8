"""Quiet Hugging Face progress bars for retool's own in-process model work.

Building the tiny model (`save_pretrained`: "Writing model shards") and the tool-call
check (`from_pretrained`: "Loading weights") would otherwise draw tqdm bars through
`retool apply`'s live view. The bars are switched off only for the calls inside
`quiet_progress()` and put back as they were afterwards, so code of the user's that shares
the process keeps its settings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")


@contextmanager
def quiet_progress() -> Iterator[None]:
    from huggingface_hub import utils as hub
    from transformers.utils import logging as tf_logging

    tf_enabled, hub_disabled = tf_logging.is_progress_bar_enabled(), hub.are_progress_bars_disabled()
    tf_logging.disable_progress_bar()  # transformers' own switch, and huggingface_hub's
    try:
        yield
    finally:
        if tf_enabled:
            tf_logging.enable_progress_bar()
        if hub_disabled:
            hub.disable_progress_bars()
        elif hub.are_progress_bars_disabled():
            hub.enable_progress_bars()


def quiet(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` without Hugging Face progress bars."""
    with quiet_progress():
        return fn(*args, **kwargs)
