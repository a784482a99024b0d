"""A file from the future: at a revision this chain does not know, written by a newer release.

Its own history says how far ahead it is (the upgrade entries past the newest revision this chain
knows), which versions wrote those, and — through the inverse journals they recorded — how to walk
it back.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from ckptmigrate.chain.revisions import Revision, RevisionGraph
from ckptmigrate.checkpoint.envelope import Envelope
from ckptmigrate.errors import NewerThanChain, RevisionError


def future_steps(path: Path, env: Envelope, graph: RevisionGraph) -> tuple[list[Revision], str | None, NewerThanChain]:
    """A file at a revision this chain does not know (a newer release wrote it): the revisions its
    own history records past the newest one this chain knows (newest first), that known one, and
    the error that says so (how far ahead, which versions wrote it).

    Raises that error when the history does not lead back to a revision this chain knows.
    """
    assert env.revision is not None
    upgrades = {e.get("revision"): e for e in env.history if e.get("action") == "upgrade"}
    steps: list[Revision] = []
    entries: list[dict[str, Any]] = []
    rev: str | None = env.revision
    while rev is not None and not graph.knows(rev) and len(steps) <= len(env.history):
        entry = upgrades.get(rev)
        if entry is None:
            break
        entries.append(entry)
        parent = entry.get("from")
        steps.append(Revision(rev, (parent,) if isinstance(parent, str) else (), env.lineage,
                              str(entry.get("message") or ""), Path(str(entry.get("script") or rev)), None, None))
        rev = parent if isinstance(parent, str) else None
    known = graph.get(rev).id if rev is not None and graph.knows(rev) else None
    writers = sorted({w for e in entries for w in _writer(e, env.ckptmigrate_version)})
    ahead = [s.id for s in steps]
    floors = [r for r in graph.revisions.values() if r.final and r.lineage == env.lineage]
    if known is None and floors:  # its history meets nothing this chain knows: it is from below the floor
        raise RevisionError(
            f"{path}: revision {env.revision} is not in this chain, whose floor is {floors[0]} "
            f"(final = True: the revisions below it were removed); "
            f"{floors[0].last_release or 'a release from before the floor'} is the last release that can "
            f"upgrade it to {floors[0].id}")
    if rev is not None and known is None:
        raise NewerThanChain(
            f"{path}: revision {env.revision} is not in the installed chain, and the file's history "
            f"does not lead back to a revision it knows; written by {', '.join(writers) or 'an unknown version'}",
            env.revision, None, ahead, writers)
    head = ""
    with contextlib.suppress(RevisionError):
        head = f" (head {graph.head(graph.lineage_of(known) if known else env.lineage).id})"
    if env.revision in graph.squashed:
        squash = graph.revisions[graph.squashed[env.revision]]
        partway = NewerThanChain(
            f"{path}: revision {env.revision} was squashed into {squash} ({', '.join(squash.aliases)}), and "
            f"the file is part-way through it; downgrade it to {known or 'base'} (its own journal walks it "
            "back), then upgrade", env.revision, known, ahead[::-1], writers, path=path)
        partway.cli_hint = f"`ckptmigrate downgrade {path} --to {known or 'base'}`"
        return steps, known, partway
    newer = NewerThanChain(
        f"{path}: the file is newer than the installed chain{head}: {len(ahead)} recorded revision"
        f"{'s' if len(ahead) != 1 else ''} past {known or 'base'} ({', '.join(reversed(ahead))}), written by "
        f"{', '.join(writers)}; install the release that wrote it, or downgrade it to {known or 'base'} "
        "(its own journal walks it back)", env.revision, known, ahead[::-1], writers, path=path)
    newer.cli_hint = f"`ckptmigrate downgrade {path} --to {known or 'base'}`"
    return steps, known, newer


def _writer(entry: dict[str, Any], fallback: str) -> list[str]:
    chain = entry.get("chain")
    version = entry.get("ckptmigrate_version") or fallback
    return [str(chain)] * bool(chain) + [f"ckptmigrate {version}"]
