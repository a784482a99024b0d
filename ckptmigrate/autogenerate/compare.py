"""Schema comparisons as plain functions: ``check`` (does head's snapshot describe the current model?)
and ``diff`` (any two of a checkpoint, a revision, the model). The CLI commands only print them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptmigrate.autogenerate.plan import diff_schemas
from ckptmigrate.autogenerate.schema_diff import SchemaDiff
from ckptmigrate.chain import project, schemas
from ckptmigrate.errors import BadInput, CkptMigrateError
from ckptmigrate.util.urls import is_remote


@dataclass
class Comparison:
    """Schema ``a`` against schema ``b`` (labels say what each is) and their difference."""

    a: str
    b: str
    difference: SchemaDiff

    @property
    def same(self) -> bool:
        return self.difference.empty

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "same": self.same, **self.difference.to_dict()}


@dataclass
class Check:
    """Head's snapshot (``head``) against the model ``model``: ``ok`` when they are equal."""

    head: str
    model: str
    difference: SchemaDiff

    @property
    def ok(self) -> bool:
        return self.difference.empty

    def to_dict(self) -> dict[str, Any]:
        return {"head": self.head, "model": self.model, "ok": self.ok, **self.difference.to_dict()}


def check(*, model: str | None = None, migrations: str | os.PathLike[str] | None = None,
          lineage: str | None = None) -> Check:
    """Compare the head revision's schema snapshot with the current model's (built on ``meta``)."""
    head = project.revision_graph(migrations).head(lineage)
    snapshot = head.schema()
    if snapshot is None:
        error = BadInput(f"head {head.id} has no schema snapshot ({head.schema_path})", path=head.schema_path)
        error.cli_hint = f"record one: ckptmigrate schema record {head.id}"
        raise error
    spec = schemas.model_spec(model)
    return Check(head.id, spec, diff_schemas(snapshot, schemas.model_schema(spec)))


def diff(a: str | os.PathLike[str], b: str | os.PathLike[str] = "model", *, model: str | None = None,
         migrations: str | os.PathLike[str] | None = None) -> Comparison:
    """The difference between two schemas; each of ``a`` and ``b`` is a checkpoint path, a revision id
    or ``"model"``. A chain that does not load is reported when a revision is asked of it, naming the
    broken script, not as "neither a file nor a revision"."""
    graph: Any = None
    broken: CkptMigrateError | None = None
    try:
        graph = project.revision_graph(migrations)
    except CkptMigrateError as exc:
        broken = exc
    resolved = []
    for source in (os.fspath(a), os.fspath(b)):
        if broken is not None and source != "model" and not is_remote(source) and not Path(source).exists():
            raise broken
        resolved.append(schemas.resolve(source, graph=graph, model=model))
    (label_a, schema_a), (label_b, schema_b) = resolved
    return Comparison(label_a, label_b, diff_schemas(schema_a, schema_b))
