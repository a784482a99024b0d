"""A checkpoint opened lazily: its state dict as references, its extras, its envelope.

Opening reads the zip directory and ``data.pkl`` (or the safetensors header), never tensor bytes.
Values are memory-mapped when a migration or the user asks for them, and written back one tensor
at a time; when every tensor is still where it was, only metadata is rewritten.
"""

from __future__ import annotations

import math
import os
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from itertools import repeat
from operator import attrgetter, mul
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptmigrate import formats
from ckptmigrate.checkpoint import copies as copies_
from ckptmigrate.checkpoint import model_config
from ckptmigrate.checkpoint.envelope import Envelope, architecture_hash_of, key_text, schema_of
from ckptmigrate.checkpoint.layout import Layout, LayoutError, locate, module_class, set_at
from ckptmigrate.errors import BadInput, CkptMigrateError, CkptMigrateWarning
from ckptmigrate.formats import dcp, multifile, torchzip
from ckptmigrate.formats.pickle_safety import WEIGHTS_ONLY_GLOBALS, PickleSafety, assess, python3_name
from ckptmigrate.ops.architecture import ArchitectureOps
from ckptmigrate.ops.optimizer import OptimizerTrack
from ckptmigrate.storage.atomic import atomic_write
from ckptmigrate.tensors.refs import (
    ITEMSIZE,
    ComposedTensor,
    Entry,
    Storage,
    TensorRef,
    device_of,
    dtype_of,
    is_entry,
    shape_of,
)
from ckptmigrate.tensors.state_dict import LazyStateDict
from ckptmigrate.util.gcpause import pausing

if TYPE_CHECKING:
    import torch


class Checkpoint(ArchitectureOps):
    """A checkpoint file: ``state_dict``, ``extras``, ``metadata`` (the envelope) and ``applied``."""

    def __init__(
        self, container: formats.Container, layout: Layout, state_dicts: Sequence[str] | None = None,
    ) -> None:
        self.container = container
        self.path = container.path
        self.format = container.format
        self.layout = layout
        raw = layout.state_dict(container.payload)
        self._as_read = list(raw.items()) if layout.kind == "module" else []
        self.state_dict = LazyStateDict(raw)
        self.extras: dict[str, Any] = layout.extras(container.payload)
        self.envelope: Envelope | None = None
        if container.envelope is not None:
            try:
                self.envelope = Envelope.from_dict(container.envelope, origin=str(self.path))
            except (TypeError, ValueError) as exc:
                raise BadInput(str(exc) if str(self.path) in str(exc) else f"{self.path}: {exc}") from exc
        self.applied: list[str] = []
        self.head_revision: str | None = None
        self.map_location: Any = None
        self.mmap = True
        self._config: dict[str, Any] | None = None
        self._trusted = False  # trust_pickle ran: the extras are real objects
        if state_dicts is None and self.envelope is not None and self.envelope.state_dicts:
            state_dicts = self.envelope.state_dicts  # what an earlier run found, unless declared anew
        try:
            self.copies, self.copy_problems, self.other_tensor_dicts = copies_.find(
                container.payload, layout, self.state_dict.entries, state_dicts
            )
        except LayoutError as exc:
            raise BadInput(f"{self.path}: {exc}", path=self.path) from exc
        for copy in self.copies:
            copy.owner = self
        super().__init__()
        if self.optimizers.problem:
            self._track_optimizers()

    def _track_optimizers(self) -> None:
        """Align optimizer state with the parameters, using the keys an earlier migration recorded
        when buffers cannot be told from parameters."""
        history = self.envelope.history if self.envelope is not None else []
        known = next((e["optimizer_params"] for e in reversed(history)
                      if isinstance(e, dict) and isinstance(e.get("optimizer_params"), list)), None)
        policy = self.optimizers.policy
        self.optimizers = OptimizerTrack.find(self.extras, list(self.state_dict.entries), known)
        self.optimizers.policy = policy

    @classmethod
    @pausing
    def open(
        cls, path: str | os.PathLike[str], *, key: str | None = None, state_dicts: Sequence[str] | None = None,
        remote: Any = None,
    ) -> Checkpoint:
        """Open lazily (no tensor bytes read). ``key`` is the state dict's location (default: the one
        the envelope recorded, else detected); ``state_dicts`` declares every copy of it (default: searched);
        ``remote`` is the object to read ``path`` from (see :func:`ckptmigrate.formats.read`)."""
        try:
            container = formats.read(path, remote=remote)
        except CkptMigrateError as exc:
            exc.path = exc.path or os.fspath(path)  # the file is the fact a caller acts on
            raise
        recorded = container.envelope.get("layout") if isinstance(container.envelope, Mapping) else None
        try:
            layout = locate(container.payload, key, recorded=recorded if isinstance(recorded, str) else None)
            return cls(container, layout, state_dicts)
        except LayoutError as exc:
            container.close()
            raise BadInput(f"{container.path}: {exc}", path=container.path) from exc
        except BaseException:
            container.close()
            raise

    @classmethod
    def from_payload(
        cls, payload: Any, *, name: str = "<memory>", key: str | None = None,
        state_dicts: Sequence[str] | None = None,
    ) -> Checkpoint:
        """A checkpoint over an in-memory payload (a state dict of torch tensors, a checkpoint dict)."""
        container = formats.Container("memory", Path(name), None, payload, None, {})
        try:
            layout = locate(payload, key)
        except LayoutError as exc:
            raise BadInput(f"{name}: {exc}") from exc
        return cls(container, layout, state_dicts)

    def refuse_copies_left_behind(self) -> None:
        """A migration must not leave a dict that looks like a copy of the weights at the old revision."""
        if self.copy_problems:
            raise BadInput(f"{self.path}: {self.copy_problems[0]}", path=self.path)

    def locations(self) -> list[str]:
        """Where every copy of the weights sits, the state dict first ("" for a bare state dict)."""
        return [self.layout.key or "", *(c.location for c in self.copies)]

    def recorded_locations(self) -> list[str]:
        """What the envelope records: the locations when there are copies (none: searched again)."""
        return self.locations() if self.copies else []

    def close(self) -> None:
        """Release the file (its memory maps stay valid while tensors from it are alive)."""
        self.container.close()

    def trust_pickle(self) -> str | None:
        """Run the file's pickle code (``torch.load(weights_only=False)``) so the extras, and the
        state dict's non-tensor entries, are real objects instead of inert stand-ins — for files the
        user trusts; the tensors stay lazy references.

        Where that would change nothing, no code runs and the reason is returned (and warned about,
        :class:`~ckptmigrate.errors.CkptMigrateWarning`): a caller who asked for it should know.
        """
        import warnings

        reason = None
        if self.format == "hf-sharded":
            reason = "the shards of a sharded model hold only tensors"
        elif self.format not in ("torch-zip", "torch-legacy", "dcp"):
            reason = f"a {self.format} file holds no pickle"
        elif self.layout.kind == "module":
            reason = "a whole pickled module is taken apart without running its code, trusted or not"
        elif not _has_stand_ins([self.extras, list(self.state_dict.entries.values())]):
            reason = "its pickle holds only tensors and plain data, which are read as they are"
        if reason is not None:
            note = f"{self.path}: trust_pickle has nothing to do: {reason}"
            warnings.warn(note, CkptMigrateWarning, stacklevel=2)
            return note
        import torch

        self._trusted = True
        try:
            if self.format == "dcp":  # each non-tensor value is a torch.save archive of its own
                real = dcp.trusted(self.container.parts, self.container.payload)
            else:
                real = torch.load(self.path, map_location="cpu", weights_only=False, mmap=self.format == "torch-zip")
        except Exception as exc:  # noqa: BLE001 - whatever the file's own code raises
            raise BadInput(f"{self.path}: running its pickle code failed: {type(exc).__name__}: {exc}",
                           path=self.path) from exc
        if self.layout.kind == "key":
            self.extras = self.layout.extras(real)
            real = self.layout.state_dict(real)
            for copy in self.copies:  # the copies stay the lazy dicts the ops edit
                set_at(self.extras, copy.where, copy.source)
            self._track_optimizers()  # the optimizer state the migration edits is the one written
        entries = self.state_dict.entries
        for k, v in list(entries.items()):
            if not is_entry(v) and isinstance(real, Mapping) and k in real:
                entries[k] = real[k]
        return None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def metadata(self) -> dict[str, Any] | None:
        """The envelope as a plain dict, or None for an unstamped file."""
        return None if self.envelope is None else self.envelope.to_dict()

    @property
    def config(self) -> dict[str, Any]:
        """The model's configuration for ops (``ckpt.config["num_attention_heads"]``): what was set
        from the model factory, else Lightning's hyper-parameters, else a ``config.json`` beside the file."""
        if self._config is None:
            self._config = model_config.find(self.extras, self.path if self.format != "memory" else None)
        return self._config

    @config.setter
    def config(self, value: dict[str, Any]) -> None:
        self._config = dict(value)

    @property
    def revision(self) -> str | None:
        """The revision recorded in the envelope, or None."""
        return None if self.envelope is None else self.envelope.revision

    def _pickle_roots(self) -> list[Any] | None:
        """What the file's pickle will hold when written: a pickled module is its payload."""
        if self.layout.kind == "module":
            return [self.container.payload]
        return super()._pickle_roots()

    def _pickle_objects(self) -> str:
        """A payload handed over in memory holds real objects; so do the extras after trust_pickle."""
        if self.format == "memory":
            return "real"
        return "trusted" if self._trusted else "inert"

    def _pickle_changed(self, named: dict[str, bool]) -> None:
        """After ``rename_global``/``sanitize``: the verdict is on the globals the payload names now
        (torch's own, which the writer names for tensors, are kept)."""
        kept = {n: c for n, c in self.container.pickle_globals.items() if python3_name(n) in WEIGHTS_ONLY_GLOBALS}
        self.container.pickle_globals = {**kept, **named}

    def pickle_safety(self) -> PickleSafety:
        """Whether ``torch.load(weights_only=True)`` reads the file, and the globals that stop it."""
        return assess(self.container.pickle_globals)

    def tensors(self) -> dict[str, Entry]:
        """The state dict's tensors as references (key → where its bytes are), no bytes read."""
        entries = self.state_dict.entries
        if set(map(type, entries.values())) == {TensorRef}:  # a file as read: a copy, in C
            return dict(entries)
        return {k: v for k, v in entries.items() if is_entry(v)}

    def schema(self) -> dict[str, dict[str, Any]]:
        """key → {"shape", "dtype"} of every tensor in the state dict, in order."""
        try:
            return schema_of(self.state_dict.entries)
        except BadInput as exc:
            raise BadInput(f"{self.path}: {exc}") from None

    def arch_hash(self) -> str:
        """The architecture hash of :meth:`schema` (docs/format.md)."""
        try:
            return architecture_hash_of(self.state_dict.entries)
        except BadInput as exc:
            raise BadInput(f"{self.path}: {exc}") from None

    def module_intact(self) -> bool:
        """A pickled module whose state dict no op has touched: it can be written back as a module."""
        entries = self.state_dict.entries
        return (
            self.layout.kind == "module" and len(entries) == len(self._as_read)
            and all(k in entries and entries[k] is v for k, v in self._as_read)
        )

    def output_layout(self) -> Layout:
        """The layout :meth:`write` produces (a pickled module is only ever written back intact)."""
        return self.layout

    def refuse_changed_module(self) -> None:
        """A whole pickled ``nn.Module`` whose weights a migration changed cannot be written: its
        structure is its class's code, which no migration changes, and writing a plain state dict
        instead would change what ``torch.load`` returns for the file."""
        if self.layout.kind == "module" and not self.module_intact():
            raise BadInput(
                f"{self.path}: holds a whole pickled nn.Module ({module_class(self.container.payload)}), whose "
                "structure comes from its class's code, which a migration cannot change; nothing was written. "
                "Save its state_dict() and migrate that, or upgrade it in memory with ckptmigrate.load()"
            )

    def payload(self) -> Any:
        """The whole object ``torch.load`` would return, with the current state dict and extras in it."""
        if self.layout.kind == "module":
            self.refuse_changed_module()
            return self.container.payload
        for copy in self.copies:
            copy.commit()
        return self.layout.rebuild(self.container.payload, self.state_dict.entries, self.extras)

    def materialize(self) -> OrderedDict[str, torch.Tensor]:
        """The state dict as torch tensors: memory-mapped where unchanged (unless ``mmap`` is off),
        on the CPU unless ``map_location`` says otherwise; a parameter or a tensor that required grad
        in the file is one here too, as ``torch.load`` returns it."""
        import torch

        from ckptmigrate.formats.pickled import global_name
        from ckptmigrate.formats.torch_builds import realize_value

        out = self.state_dict.copy()
        for k, v in out.items():
            if not is_entry(v):
                out[k] = realize_value(v, global_name)
                continue
            if not self.mmap:
                v = v.clone()
            if self.map_location is not None:
                v = v.to(self.map_location)
            ref = self.state_dict.entries[k]
            if isinstance(ref, TensorRef) and ref.extra.get("parameter"):
                v = torch.nn.Parameter(v, requires_grad=ref.requires_grad)
            elif isinstance(ref, TensorRef) and ref.requires_grad and (v.is_floating_point() or v.is_complex()):
                v = v.requires_grad_()
            out[k] = v
        return out

    def materialize_copies(self) -> None:
        """Every copy of the weights as torch tensors, in place in the payload: for an in-memory
        checkpoint handed back to a framework (Lightning's ``on_load_checkpoint``)."""
        for copy in self.copies:
            entries = copy.state_dict.entries
            for k in list(entries):
                if is_entry(entries[k]):
                    entries[k] = copy.state_dict[k]
            copy.commit()

    def summary(self, *, keys: bool = False) -> dict[str, Any]:
        """What ``inspect`` shows: container, layout, envelope, counts, bytes, dtypes, devices."""
        tensors = self.tensors()
        parameters, nbytes, dtypes, devices = _totals(tensors.values())
        info: dict[str, Any] = {
            "path": str(self.path),
            "container": self.format,
            "layout": self.layout.name,
            "stamped": self.envelope is not None,
            "tensors": len(tensors),
            "parameters": parameters,
            "bytes": nbytes,
            "dtypes": dtypes,
            "devices": devices,
            "arch_hash": self.arch_hash(),
            "extras": sorted(map(str, self.extras)),
            "state_dicts": self.locations(),
            "state_dict_problems": [str(p) for p in self.copy_problems],
            "files": _files(self.container),
            "envelope": None if self.envelope is None else self.envelope.to_dict(schema=False),
            "pickle": self.pickle_safety().to_dict() if self.format in ("torch-zip", "torch-legacy") else None,
        }
        if keys:
            info["keys"] = {
                key_text(k): {"shape": list(shape_of(v)), "dtype": dtype_of(v), "device": device_of(v)}
                for k, v in tensors.items()
            }
        return info

    def can_rewrite_metadata_only(self, fmt: str) -> bool:
        """True when writing ``fmt`` needs no tensor bytes moved: every tensor is still in this zip."""
        if fmt != "torch-zip" or self.format != "torch-zip":
            return False
        source = self.container.source
        for v in _walk_tensors(self.payload()):
            storage = v.storage if isinstance(v, TensorRef) else v
            if not (isinstance(storage, Storage) and storage.source is source and storage.crc32 is not None):
                return False
        return True

    def write(
        self, dest: str | os.PathLike[str], envelope: Envelope | None, *, fmt: str | None = None,
        append_in_place: bool = True, compact: bool = False, keep_old: bool = False,
        max_shard_bytes: int | None = None,
    ) -> Path:
        """Write atomically to ``dest`` (which may be this file): the source survives any failure.

        Rewriting this very zip file when only metadata changed appends to it in place
        (``append_in_place``); otherwise a temporary sibling is written and renamed over ``dest``.
        ``compact`` writes only the live records, dropping bytes earlier appends orphaned.
        A multi-file checkpoint is written as one switch of its files (``keep_old`` keeps the old
        shards, which a backup of its index names).
        """
        dest = Path(dest)
        multi = self.format in formats.MULTI_FORMATS
        fmt = fmt or (self.format if multi or self.format == "safetensors" else "torch-zip")
        payload = self.payload()
        metadata_only = self.can_rewrite_metadata_only(fmt) and not compact
        # a metadata-only write only encodes the envelope: no copy of it (and of its schema)
        env = None if envelope is None else envelope.to_dict(copy=not metadata_only)
        if fmt in ("safetensors", "hf-sharded") and (self.extras or not isinstance(payload, MutableMapping)):
            raise BadInput(
                f"{dest}: safetensors holds only tensors; the extras "
                f"{sorted(map(str, self.extras))} would be lost — write a torch file instead"
            )
        if fmt in ("safetensors", "hf-sharded"):
            non_tensor = [k for k, v in payload.items() if not is_entry(v)]
            if non_tensor:
                raise BadInput(f"{dest}: safetensors cannot hold the non-tensor entries {non_tensor[:5]}")
        expected = None if metadata_only else self.schema()

        def check(written: Path) -> None:
            self.check_reads_back(written, env, expected, shown=dest)

        if fmt in formats.MULTI_FORMATS:
            return multifile.write(self.container.parts, fmt, dest, payload, env, check, keep_old=keep_old,
                                   max_shard_bytes=max_shard_bytes, compact=compact)
        if not metadata_only:
            with atomic_write(dest, check=check) as fh:
                formats.write_container(fh, fmt, payload, env, template=self.container)  # type: ignore[arg-type]
            return dest
        c = self.container
        assert c.source is not None
        pickled = torchzip.Pickled(payload)
        env_record = torchzip.envelope_record(env)

        def check_metadata(written: Path, appended_to: int | None = None) -> None:
            """Read back as torch reads it: the records written are the bytes meant (no re-unpickling);
            after an in-place append, only what it appended is parsed."""
            problem = torchzip.verify_metadata_only(written, c.records, c.prefix, pickled, env_record,
                                                    appended_to=appended_to)
            if problem is not None:
                raise BadInput(f"{dest}: the written file does not read back as written ({problem}); "
                               "nothing was replaced")

        same_file = dest.exists() and dest.resolve() == self.path.resolve()
        if append_in_place and same_file and self._append(pickled, env_record, check_metadata):
            return dest
        with atomic_write(dest, check=check_metadata) as fh:
            torchzip.write_metadata_only(fh, c.source, c.records, c.prefix, pickled, env_record)
        return dest


    def check_reads_back(self, written: str | os.PathLike[str], env: dict[str, Any] | None,
                         expected: dict[str, Any] | None, *, shown: object = None, remote: Any = None) -> None:
        """Re-open what was written (``remote``: the object-to-be, before it is sent): the index and
        envelope must be what we meant to write (``expected`` is :meth:`schema` before the write)."""
        shown = shown if shown is not None else written
        with Checkpoint.open(written, key=self.layout.key if self.layout.kind == "key" else None,
                             remote=remote) as again:
            if again.schema() != expected:
                raise BadInput(f"{shown}: the written file does not read back as written; nothing was replaced")
            # the envelope as read (JSON), not ``again.metadata``: a copy of a schema per check
            if env is not None and again.container.envelope != env:
                raise BadInput(f"{shown}: the written envelope does not read back; nothing was replaced")

    def _append(self, payload: torchzip.Pickled, env: bytes | None, check: Any) -> bool:
        """The in-place path: append to this file; if the append or its read-back fails, cut the file
        back to the archive it held (whose bytes are never touched)."""
        c = self.container
        assert c.source is not None
        if os.stat(self.path).st_size != c.source.size:
            raise BadInput(f"{self.path}: changed on disk while it was being migrated; nothing was written")
        size = torchzip.live_end(c.source)
        try:
            if not torchzip.append_in_place(self.path, c.source, c.records, c.prefix, payload, env):
                return False
            check(self.path, size)
        except BaseException:
            os.truncate(self.path, size)
            raise
        return True


def _files(container: formats.Container) -> list[str]:
    """The files of a multi-file checkpoint (shards, ``.distcp``), else the one file."""
    parts = container.parts
    if parts is None:
        return [container.path.name]
    return sorted(parts.files())


def _totals(tensors: Iterable[Any]) -> tuple[int, int, dict[str, int], list[str]]:
    """(elements, bytes of tensor data, tensors per dtype, devices) in one pass: ``inspect`` of a
    checkpoint of many tensors pays per tensor once, not once per figure. A view shared by several
    keys (tied weights) is counted once in the bytes."""
    tensors = list(tensors)
    if set(map(type, tensors)) == {TensorRef}:  # a file as read: C loops, when no storage has two views
        storages = list(map(_STORAGE, tensors))
        if len(set(storages)) == len(storages):  # storages hash by identity
            numels = list(map(math.prod, map(_SHAPE, tensors)))
            kinds = list(map(_DTYPE, tensors))
            counts = dict(Counter(kinds))
            elements = sum(numels)
            if len(counts) == 1:  # one dtype (most files): its item size times the elements
                nbytes = elements * ITEMSIZE.get(kinds[0], 0)
            else:
                nbytes = sum(map(mul, numels, map(ITEMSIZE.get, kinds, repeat(0))))
            return elements, nbytes, counts, sorted(set(map(_LOCATION, storages)))
    parameters = 0
    total = 0
    dtypes: dict[str, int] = {}
    devices: set[str] = set()
    seen: set[tuple[Any, ...]] = set()
    first: dict[int, TensorRef] = {}  # storage: the first view of it (most storages have one)
    prod = math.prod
    for v in tensors:
        if type(v) is TensorRef or isinstance(v, TensorRef):
            numel, dtype, storage = prod(v.shape), v.dtype, v.storage
            devices.add(storage.location)
            other = first.get(id(storage))
            if other is None:
                first[id(storage)] = v
                total += numel * ITEMSIZE.get(dtype, 0)
            else:  # a storage seen before (tied weights, views): a view counts once
                seen.add(_view(other))
                view = _view(v)
                if view not in seen:
                    seen.add(view)
                    total += numel * ITEMSIZE.get(dtype, 0)
        else:
            numel, dtype = _numel(v), dtype_of(v)
            devices.add(device_of(v))
            total += _nbytes(v)
        parameters += numel
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
    return parameters, total, dtypes, sorted(devices)


_STORAGE, _SHAPE, _DTYPE, _LOCATION = (attrgetter("storage"), attrgetter("shape"), attrgetter("dtype"),
                                       attrgetter("location"))


def _view(v: TensorRef) -> tuple[Any, ...]:
    return (id(v.storage), v.storage_offset, v.shape, v.stride, v.dtype)


def _numel(v: Any) -> int:
    return math.prod(shape_of(v))


def _nbytes(v: Any) -> int:
    return _numel(v) * ITEMSIZE.get(dtype_of(v), 0)


def _has_stand_ins(obj: Any, _depth: int = 0) -> bool:
    """True when ``obj`` holds an inert stand-in anywhere: something trusted pickle code would rebuild."""
    from ckptmigrate.formats.pickled import StandIn

    if isinstance(obj, StandIn) or _depth > 200:
        return True
    if isinstance(obj, dict):
        return any(_has_stand_ins(v, _depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_stand_ins(v, _depth + 1) for v in obj)
    return False


def _walk_tensors(obj: Any, _path: set[int] | None = None) -> Iterator[Any]:
    """Every tensor in a payload (state dict, optimizer state, extras), and every storage a tensor
    built from parts holds (a quantized tensor's), cycles followed once."""
    from ckptmigrate.formats.pickled import StandIn

    path = set() if _path is None else _path
    if len(path) > 200:
        raise BadInput("the checkpoint payload is nested too deeply")
    if id(obj) in path:
        return
    if isinstance(obj, Storage) or (is_entry(obj) and not isinstance(obj, ComposedTensor)):
        yield obj
        return
    if isinstance(obj, ComposedTensor):
        children: Any = obj.args
    elif isinstance(obj, dict):
        children = obj.values()
    elif isinstance(obj, (list, tuple)):
        children = obj
    elif isinstance(obj, StandIn):
        children = [obj.args, obj.state, obj.listitems, obj.dictitems]
    else:
        return
    path.add(id(obj))
    for v in children:
        if type(v) is TensorRef:  # most of a payload: yielded without a generator of its own
            yield v
        else:
            yield from _walk_tensors(v, path)
    path.discard(id(obj))
