"""Pause Python's cyclic garbage collector while a checkpoint's metadata is parsed or pickled.

Reading or writing the metadata of a checkpoint allocates a few objects per tensor (records, tuples,
references) and frees almost none of them: every allocation threshold the collector crosses makes
it traverse the objects made so far, for nothing. At 20,000 tensors that is a quarter of the CPU
time of an ``inspect``. The collector is paused for the call only (reference counting still frees
what is dropped) and resumed as it was, so code around it is unaffected.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

_P = ParamSpec("_P")
_R = TypeVar("_R")


@contextmanager
def paused() -> Iterator[None]:
    """No cyclic collection inside the block; the collector is left as it was found."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def pausing(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``fn`` run inside :func:`paused`."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with paused():
            return fn(*args, **kwargs)

    return wrapper
