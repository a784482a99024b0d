"""The envelope's schema: every field's JSON type, checked before anything reads a field.

An envelope comes from a file, so each field can hold anything JSON can: a list where tags should
be, an object where a revision id should be, a string nested 900 lists deep, a lone surrogate
that no terminal can print. :func:`validate` walks the record once (iteratively: a deep one
cannot exhaust the stack) and raises ValueError with one line naming the first field that is not
what ckptmigrate writes. The record itself is not changed: a signature covers it as stored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from itertools import chain
from operator import itemgetter
from typing import Any

#: deeper than anything ckptmigrate writes (an op's inverse inside a history entry is ~6 levels)
MAX_DEPTH = 64

Check = Callable[[Any], bool]


def _str(v: Any) -> bool:
    return isinstance(v, str)


def _opt_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt_obj(v: Any) -> bool:
    return v is None or isinstance(v, dict)


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _str_map(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(x, str) for x in v.values())


def _schema(v: Any) -> bool:
    return isinstance(v, dict) and all(
        isinstance(e, dict) and isinstance(e.get("dtype"), str) and isinstance(e.get("shape"), list)
        and all(_int(d) and d >= 0 for d in e["shape"])
        for e in v.values()
    )


_DTYPE, _SHAPE = itemgetter("dtype"), itemgetter("shape")


def _all_str(values: Any) -> bool:
    """Whether every item is exactly a ``str`` (one C loop)."""
    return set(map(type, values)) == {str}


def _plain_schema(v: Any) -> bool:
    """Whether ``v`` is a schema as ckptmigrate writes it — every entry exactly ``{"dtype": str,
    "shape": [int >= 0, ...]}``, no key or dtype with a lone surrogate — checked a column at a time
    (a few C loops, not a Python step per tensor). False leaves the schema to the general walk."""
    if type(v) is not dict:
        return False
    entries = list(v.values())
    if not entries:
        return True
    if set(map(type, entries)) != {dict} or set(map(len, entries)) != {2}:
        return False
    try:
        dtypes, shapes = list(map(_DTYPE, entries)), list(map(_SHAPE, entries))
    except KeyError:
        return False
    if not _all_str(dtypes) or set(map(type, shapes)) != {list}:
        return False
    dims = list(chain.from_iterable(shapes))
    if dims and (set(map(type, dims)) != {int} or min(dims) < 0):
        return False
    if not _all_str(v):
        return False
    return not (_bad_text("".join(v)) or _bad_text("".join(set(dtypes))))


def _git(v: Any) -> bool:
    return v is None or (
        isinstance(v, dict)
        and all(_opt_str(v.get(k)) for k in ("commit", "branch", "remote", "root"))
        and (v.get("dirty") is None or isinstance(v.get("dirty"), bool))
    )


def _history(v: Any) -> bool:
    return isinstance(v, list) and all(_history_entry(e) for e in v)


def _revision_or_parents(v: Any) -> bool:
    """A history entry's ``from``/``to``: a revision, none (base), or a merge's parents."""
    return _opt_str(v) or (isinstance(v, list) and all(isinstance(p, str) for p in v))


def _history_entry(e: Any) -> bool:
    return (
        isinstance(e, dict)
        and all(_opt_str(e.get(k)) for k in ("action", "revision", "at", "message", "script"))
        and all(_revision_or_parents(e.get(k)) for k in ("from", "to"))
        and (e.get("inverse") is None or isinstance(e.get("inverse"), list))
        and (e.get("tags") is None or _str_map(e.get("tags")))
        and (e.get("ops") is None or isinstance(e.get("ops"), list))
    )


def _digest(v: Any) -> bool:
    return v is None or (
        isinstance(v, dict) and _opt_str(v.get("alg")) and _opt_str(v.get("overall"))
        and _opt_str(v.get("payload")) and (v.get("tensors") is None or _str_map(v.get("tensors")))
    )


FIELDS: dict[str, tuple[Check, str]] = {
    "schema": (_schema, 'an object of {"shape": [int, ...], "dtype": str}'),
    "arch_hash": (_str, "a string"),
    "layout": (_str, "a string"),
    "devices": (_str_list, "a list of strings"),
    "torch": (_opt_str, "a string or null"),
    "cuda": (_opt_str, "a string or null"),
    "cudnn": (_opt_str, "a string or null"),
    "python": (_str, "a string"),
    "platform": (_str, "a string"),
    "git": (_git, "null or an object of commit/branch/remote/root strings and a dirty flag"),
    "lineage": (_opt_str, "a string or null"),
    "revision": (_opt_str, "a string or null"),
    "history": (_history, "a list of history entries (objects with string action and revision, "
                           "from/to a revision or a merge's parents)"),
    "tags": (_str_map, "an object of strings"),
    "created_at": (_str, "a string"),
    "ckptmigrate_version": (_str, "a string"),
    "format_version": (_int, "an integer"),
    "digest": (_digest, "null or a digest object (alg, overall, payload, tensors as strings)"),
    "signature": (_opt_obj, "null or an object"),
}
REQUIRED = ("schema", "arch_hash", "layout", "devices")


def _bad_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_structure(data: Any) -> None:
    """No nesting deeper than :data:`MAX_DEPTH`, no lone surrogate in any key or string.

    A list of strings (a history entry's keys) and an object of strings (tags, per-tensor digests)
    below the top have their text checked at once, not a string at a time: the same verdict (the
    joined text stands where the strings stood, one level down)."""
    stack: list[tuple[Any, int, str]] = [(data, 0, "")]
    while stack:
        value, depth, where = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"the envelope's {where or 'record'} is nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, str):
            if _bad_text(value):
                raise ValueError(f"the envelope's {where or 'record'} holds a lone surrogate (not UTF-8 text)")
        elif isinstance(value, dict):
            if where and value and _all_str(value) and _all_str(value.values()):
                if _bad_text("".join(value)):
                    raise ValueError(f"the envelope's {where} has a key with a lone surrogate")
                stack.append(("".join(value.values()), depth + 1, where))
                continue
            for k, v in value.items():
                if isinstance(k, str) and _bad_text(k):
                    raise ValueError(f"the envelope's {where or 'record'} has a key with a lone surrogate")
                stack.append((v, depth + 1, where or str(k)))
        elif isinstance(value, list):
            if value and _all_str(value):
                stack.append(("".join(value), depth + 1, where))
            else:
                stack.extend((v, depth + 1, where) for v in value)


def validate(data: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first field that is missing or of the wrong type.

    A schema as ckptmigrate writes it (:func:`_plain_schema`: three levels deep, its strings
    checked) is checked a column at a time; the rest of the record is walked."""
    plain = _plain_schema(data.get("schema"))
    check_structure({k: v for k, v in data.items() if k != "schema"} if plain else data)
    missing = [f for f in REQUIRED if f not in data]
    if missing:
        raise ValueError(f"the envelope lacks {', '.join(missing)}")
    for name, (ok, expected) in FIELDS.items():
        if name in data and not (plain and name == "schema") and not ok(data[name]):
            raise ValueError(f"the envelope's {name} is not {expected} ({type(data[name]).__name__} found); "
                             "the file's metadata is damaged or was not written by ckptmigrate")
