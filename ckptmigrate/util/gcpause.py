"""Pause Python's cyclic garbage collector while a checkpoint's metadata is parsed or pickled.

Reading or writing the metadata of a checkpoint allocates a few objects per tensor (records, tuples,
references) and frees almost none of them: every allocation threshold the collector crosses makes
it traverse the objects made so far, for nothing. At 20,000 tensors that is a fifth of the CPU
time of an ``inspect``. The collector is paused for the call only (reference counting still frees
what is dropped) and resumed as it was. A pause that allocated enough to have made the collector
run owes it a full collection, made when the next pause begins: cyclic garbage (the stand-in
classes of a payload a batch has dropped) then does not pile up in a process that reads file
after file, and a process that reads one file never pays for it.
"""

from __future__ import annotations

import functools
import gc
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

_P = ParamSpec("_P")
_R = TypeVar("_R")

_lock = threading.RLock()
_depth = 0  # pauses in progress, in every thread: the collector resumes when the last one ends
_resume = False  # whether the collector was enabled when the outermost pause began
_owed = False  # whether the last pause allocated enough to owe a full collection


@contextmanager
def paused() -> Iterator[None]:
    """No cyclic collection inside the block; the collector is left as it was found."""
    global _depth, _resume, _owed
    with _lock:
        _depth += 1
        if _depth == 1:
            _resume = gc.isenabled()
            if _resume and _owed:
                _owed = False
                gc.collect()
            gc.disable()
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _resume:
                # objects allocated and still alive since the pause began (no collection ran): as
                # many as make the collector look at its older generations
                first, second, _third = gc.get_threshold()
                _owed = gc.get_count()[0] >= first * second
                gc.enable()


def pausing(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``fn`` run inside :func:`paused`."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with paused():
            return fn(*args, **kwargs)

    return wrapper
