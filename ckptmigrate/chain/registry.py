"""Chains that installed packages ship: the entry-point group ``ckptmigrate.chains``.

A library registers ``<lineage> = "<package holding the scripts>"``; with no ``--migrations`` and
nothing in ``[tool.ckptmigrate]``, the chain for a checkpoint is the installed one named by the
lineage in its envelope, else the one that knows its revision, else — for an unstamped file — all
installed chains together, matched by schema. This is a source of its own, read only when nothing
is configured: it imports a package because a distribution named it in its metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptmigrate.chain.revisions import RevisionGraph
from ckptmigrate.chain.scripts import ScriptDirectory
from ckptmigrate.errors import BadInput, RevisionError

if TYPE_CHECKING:
    from ckptmigrate.checkpoint.envelope import Envelope

GROUP = "ckptmigrate.chains"


@dataclass(frozen=True)
class InstalledChain:
    lineage: str
    package: str
    distribution: str | None
    version: str | None

    @property
    def source(self) -> str:
        """What history entries record as the code that ran: ``mylib 2.0``."""
        return f"{self.distribution or self.package} {self.version or ''}".strip()

    def directory(self) -> ScriptDirectory:
        directory = ScriptDirectory.from_spec(self.package)
        return ScriptDirectory(directory.root, lineage=self.lineage, source=self.source)

    def graph(self) -> RevisionGraph:
        return self.directory().load()

    def describe(self) -> dict[str, Any]:
        row: dict[str, Any] = {"lineage": self.lineage, "package": self.package,
                               "distribution": self.distribution, "version": self.version}
        try:
            graph = self.graph()
            row.update(revisions=len(graph), heads=[h.id for hs in graph.heads().values() for h in hs], error=None)
        except BadInput as exc:
            row.update(revisions=0, heads=[], error=str(exc))
        return row


def installed() -> list[InstalledChain]:
    """Every chain registered under :data:`GROUP`, by lineage (the first distribution wins a name)."""
    from importlib import metadata  # ~0.1 s to import: only when nothing is configured

    found: dict[str, InstalledChain] = {}
    for ep in metadata.entry_points(group=GROUP):
        dist = getattr(ep, "dist", None)
        chain = InstalledChain(ep.name, ep.value.strip(), dist.metadata["Name"] if dist else None,
                               dist.version if dist else None)
        found.setdefault(ep.name, chain)
    return [found[k] for k in sorted(found)]


def combined() -> RevisionGraph:
    """All installed chains as one graph (each its own lineage); an error when there are none."""
    chains = installed()
    if not chains:
        raise BadInput(
            "no migrations configured: pass --migrations DIR_OR_MODULE, or run `ckptmigrate init` "
            f"to create one and record it in pyproject.toml (no installed package registers a chain under {GROUP!r})"
        )
    return RevisionGraph([rev for chain in chains for rev in chain.directory().revisions()])


class ChainSource:
    """The chain for each checkpoint: the configured graph, or the installed chain its envelope names."""

    def __init__(self, graph: RevisionGraph | None = None) -> None:
        self.graph = graph
        self._by_lineage: dict[str, RevisionGraph] = {}
        self._all: RevisionGraph | None = None

    def _lineage(self, chain: InstalledChain) -> RevisionGraph:
        if chain.lineage not in self._by_lineage:
            self._by_lineage[chain.lineage] = chain.graph()
        return self._by_lineage[chain.lineage]

    def for_lineage(self, lineage: str) -> RevisionGraph | None:
        """The installed chain named ``lineage`` (None: no such chain)."""
        for chain in installed():
            if chain.lineage == lineage:
                return self._lineage(chain)
        return None

    def find(self, env: Envelope | None) -> RevisionGraph | None:
        """Like :meth:`for_envelope`, but None for a stamped file no installed chain knows (a file of
        another model is not this library's business); an unstamped file gets every installed chain."""
        if self.graph is not None or env is None or env.revision is None:
            return self.for_envelope(env) if self.graph is not None or installed() else None
        if env.lineage is not None and self.for_lineage(env.lineage) is not None:
            return self.for_envelope(env)
        for chain in installed():
            try:
                if self._lineage(chain).knows(env.revision):
                    return self._lineage(chain)
            except RevisionError:
                continue
        return None

    def for_envelope(self, env: Envelope | None) -> RevisionGraph:
        if self.graph is not None:
            return self.graph
        chains = installed()
        if env is not None and env.lineage is not None:
            graph = self.for_lineage(env.lineage)
            if graph is not None:
                return graph
        if env is not None and env.revision is not None:
            for chain in chains:
                try:
                    graph = self._lineage(chain)
                except RevisionError:
                    continue
                if graph.knows(env.revision):
                    return graph
        if self._all is None:
            self._all = combined()
        return self._all
