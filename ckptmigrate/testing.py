"""Proving a chain in a project's own test suite: ``check_chain()`` runs what ``ckptmigrate test`` runs.

Every recorded fixture is upgraded to head, loaded into today's model and run on its recorded
inputs; invertible chains are walked back too. A failure raises :class:`ChainBroken` (an
``AssertionError``, so pytest shows it as a failed test) naming the revision whose migration broke
the model's function and the largest deviation per output. The pytest plugin adds a
``ckptmigrate_chain`` fixture that does the same for the project's configured chain.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ckptmigrate import api
from ckptmigrate.chain import config, fixtures, schemas
from ckptmigrate.chain.fixtures import FixtureResult
from ckptmigrate.errors import BadInput


class ChainBroken(AssertionError):
    """A recorded fixture no longer gives its outputs; ``results`` holds every verdict."""

    def __init__(self, message: str, results: list[FixtureResult]) -> None:
        super().__init__(message)
        self.results = results


def fixture_model(spec: str | Callable[[], Any] | None = None) -> Callable[[], Any]:
    """The factory for fixtures: ``spec``, else ``[tool.ckptmigrate] fixture_model``, else ``model``."""
    if callable(spec):
        return spec
    cfg = config.load()
    name = spec or cfg.fixture_model or cfg.model
    if not name:
        raise BadInput("no fixture model: set [tool.ckptmigrate] fixture_model (or model), or pass one")
    if not spec:
        cfg.require_trusted("model code")
    return lambda: schemas.build_model(name, device="cpu")


def example_inputs(spec: str | Callable[[], Any] | None = None) -> Callable[[], Any]:
    """The inputs for fixtures: ``spec``, else ``[tool.ckptmigrate] example_inputs``."""
    if callable(spec):
        return spec
    cfg = config.load()
    name = spec or cfg.example_inputs
    if not name:
        raise BadInput("no example inputs: set [tool.ckptmigrate] example_inputs = \"pkg.module:fn\", or pass one")
    if not spec:
        cfg.require_trusted("model code")
    fn = schemas.import_object(name, "example inputs")
    if not callable(fn):
        raise BadInput(f"example inputs {name!r}: not callable")
    return fn


def record_fixture(revision: str = "head", *, migrations: str | os.PathLike[str] | None = None,
                   model: str | Callable[[], Any] | None = None, inputs: str | Callable[[], Any] | None = None,
                   lineage: str | None = None) -> tuple[os.PathLike[str], os.PathLike[str]]:
    """Record ``revision``'s fixture (default: head) from the model as it is now."""
    graph = api.revision_graph(migrations)
    rev_id = graph.head(lineage).id if revision == "head" else graph.get(revision).id
    return fixtures.record(graph, rev_id, fixture_model(model), example_inputs(inputs))


def report(results: list[FixtureResult]) -> str:
    """One line per failure: the fixture, what broke, and the revisions to blame."""
    lines = []
    for r in results:
        if r.ok:
            continue
        blame = f"; broken by {', '.join(r.blame)}" if r.blame else ""
        what = "upgraded to head" if r.kind == "upgrade" else "walked to head and back"
        lines.append(f"fixture {r.revision} {what}: {r.problem}{blame}")
    return "\n".join(lines)


def check_chain(*, migrations: str | os.PathLike[str] | None = None, model: str | Callable[[], Any] | None = None,
                lineage: str | None = None, every_revision: bool = False) -> list[FixtureResult]:
    """Run every recorded fixture through the chain; raise :class:`ChainBroken` if any fails, or, with
    ``every_revision``, if a revision of the chain has no fixture."""
    graph = api.revision_graph(migrations)
    results = fixtures.check(graph, fixture_model(model), lineage=lineage)
    failed = report(results)
    missing = fixtures.unrecorded(graph, lineage) if every_revision else []
    if missing:
        failed = "\n".join(filter(None, [failed, missing_line(missing)]))
    if failed:
        raise ChainBroken(failed, results)
    return results


def missing_line(revisions: list[Any]) -> str:
    """The revisions without a fixture, as one line."""
    return (f"no fixture for {', '.join(rev.id for rev in revisions)}: record one with "
            f"`ckptmigrate fixture record REV` while the model is at that revision")
