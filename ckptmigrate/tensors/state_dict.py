"""The state dict a migration sees: a mutable mapping over tensor references.

Reading a key memory-maps its tensor; the ops work on ``entries``, the references themselves, so a
rename never touches bytes. Per-module ``_metadata`` versions travel with it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, MutableMapping
from typing import Any

from ckptmigrate.tensors.refs import TensorRef, is_entry, to_torch


class LazyStateDict(MutableMapping[str, Any]):
    """The state dict a migration sees: reading a key maps its tensor; assigning stores a tensor (only).

    ``entries`` holds the underlying references (what the ops work on); per-module ``_metadata``
    versions, when the file had them, travel with it.
    """

    def __init__(self, entries: MutableMapping[str, Any]) -> None:
        self.entries = entries

    def __getitem__(self, key: str) -> Any:
        value = self.entries[key]
        return to_torch(value) if isinstance(value, TensorRef) or is_entry(value) else value

    def __setitem__(self, key: str, value: Any) -> None:
        """Store a tensor; anything else is refused here, naming the key, rather than written into the
        file for ``load_state_dict`` to trip over later (extras belong in ``ckpt.extras``)."""
        if not is_entry(value):
            raise TypeError(f"state_dict[{key!r}] = {type(value).__name__}: a state dict holds tensors only; "
                            "put other values in ckpt.extras")
        self.entries[key] = value

    def __delitem__(self, key: str) -> None:
        del self.entries[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"LazyStateDict({len(self)} keys)"

    @property
    def _metadata(self) -> Any:
        return getattr(self.entries, "_metadata", None)

    def copy(self) -> OrderedDict[str, Any]:
        """A plain state dict of tensors (what ``nn.Module.load_state_dict`` copies it into)."""
        out: OrderedDict[str, Any] = OrderedDict(self.items())
        if self._metadata is not None:
            out._metadata = self._metadata  # type: ignore[attr-defined]
        return out
