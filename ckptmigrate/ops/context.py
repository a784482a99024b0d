"""What a migration script's ``upgrade(ckpt)`` / ``downgrade(ckpt)`` receives: the ops and the data
they edit, and nothing that writes, closes or walks back the file.

A script is code the engine runs between reading and writing a checkpoint; handing it the whole
:class:`~ckptmigrate.checkpoint.lazy.Checkpoint` let it call ``write``, ``close`` or
``apply_inverse`` in the middle of a migration. :class:`MigrationContext` exposes the op vocabulary
(derived from the op classes, so a new op is never left out, plus the ops a project registered with
:func:`ckptmigrate.op`), ``state_dict``, ``extras``, ``config`` and read-only facts. It notes each op
the script calls (not the ops those call in turn) so the engine can replay the same calls on every
copy of the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ckptmigrate.ops.operations import Operations

#: Public methods of the op classes a script may not call: walking back is the engine's business.
NOT_OPS = frozenset({"apply_inverse"})
#: What a script may read besides the ops (``config`` may also be assigned).
FACTS = ("state_dict", "extras", "config", "revision", "metadata", "path", "format")


def builtin_ops(target: Operations | type[Operations]) -> frozenset[str]:
    """The op names of ``target``'s class: every public method defined in ``ckptmigrate.ops``."""
    cls = target if isinstance(target, type) else type(target)
    return frozenset(
        name for base in cls.__mro__ if base.__module__.startswith("ckptmigrate.ops.")
        for name, value in vars(base).items()
        if callable(value) and not name.startswith("_") and name not in NOT_OPS
    )


class MigrationContext:
    """The checkpoint as a migration script sees it: ``ckpt.rename(...)``, ``ckpt.state_dict``, ...

    ``calls`` lists the ops called on it, in order, as ``(name, args, kwargs)``. Anything else is an
    ``AttributeError`` that lists what is available.
    """

    __slots__ = ("_target", "_ops", "_record", "calls")
    _target: Operations
    _ops: frozenset[str]
    _record: bool
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]]

    def __init__(self, target: Operations, *, record: bool = True) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_ops", builtin_ops(target))
        object.__setattr__(self, "_record", record)
        object.__setattr__(self, "calls", [])

    # -- the data the ops edit, and facts about the file -----------------------------------

    @property
    def state_dict(self) -> Any:
        """The lazy state dict (a mutable mapping; reading a key memory-maps the tensor)."""
        return self._target.state_dict

    @property
    def extras(self) -> dict[str, Any]:
        """Everything in the file besides the state dict (epoch, optimizer state, ...)."""
        return self._target.extras

    @property
    def config(self) -> dict[str, Any]:
        """The model's configuration the ops read head counts from (see ``Checkpoint.config``)."""
        return getattr(self._target, "config", None) or {}

    @config.setter
    def config(self, value: dict[str, Any]) -> None:
        self._owner.config = value

    @property
    def revision(self) -> str | None:
        """The revision the file's envelope records (where the walk started), or None."""
        return getattr(self._owner, "revision", None)

    @property
    def metadata(self) -> dict[str, Any] | None:
        """A copy of the envelope as it was read (editing it changes nothing), or None."""
        return getattr(self._owner, "metadata", None)

    @property
    def path(self) -> Any:
        """The checkpoint's path."""
        return getattr(self._owner, "path", None)

    @property
    def format(self) -> str | None:
        """The container: ``torch-zip``, ``safetensors``, ..."""
        return getattr(self._owner, "format", None)

    @property
    def _owner(self) -> Any:
        """The checkpoint itself (for a copy of the weights, the checkpoint it belongs to)."""
        return getattr(self._target, "owner", None) or self._target

    # -- the ops ---------------------------------------------------------------------------

    def available(self) -> list[str]:
        """Every name a script may use on ``ckpt``, the ops first."""
        return [*sorted(self._ops | Operations.custom_ops.keys()), *FACTS]

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        custom = Operations.custom_ops.get(name)
        if custom is None and name not in self._ops:
            raise AttributeError(
                f"a migration script's ckpt has no {name!r}: it offers the ops "
                f"{', '.join(sorted(self._ops | Operations.custom_ops.keys()))}, and {', '.join(FACTS)} "
                "(register an op of your own with @ckptmigrate.op)"
            )
        target = self._target
        run: Callable[..., Any] = (
            getattr(target, name) if custom is None
            else lambda *args, **kwargs: custom.run(target, args, kwargs)
        )
        if not self._record:
            return run

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args, kwargs))
            return run(*args, **kwargs)

        return call

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "config":
            object.__setattr__(self, name, value)
            return
        raise AttributeError(f"a migration script cannot set ckpt.{name}: edit ckpt.state_dict or ckpt.extras, "
                             "or call an op")

    def __dir__(self) -> list[str]:
        return self.available()

    def __repr__(self) -> str:
        return f"<migration context for {self.path}>"
