"""What a file's history says about the chain that made it: scripts edited since they ran on the
file, and revisions newer than the installed chain (a file from the future).

Every upgrade history entry records the sha256 of the script that ran and ckptmigrate's version
(and, for an installed chain, the distribution that shipped it). Reading a file's state costs no
script import when its revision is known: the ids are read from the scripts' source.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from ckptmigrate.chain.future import future_steps
from ckptmigrate.chain.registry import ChainSource, installed
from ckptmigrate.chain.revisions import RevisionGraph
from ckptmigrate.chain.scripts import ScriptDirectory
from ckptmigrate.checkpoint.envelope import Envelope
from ckptmigrate.errors import BadInput, NewerThanChain


def declared_ids(directory: ScriptDirectory) -> set[str]:
    """The ``revision = "..."`` of every script, read from the source (nothing is imported)."""
    ids = set()
    for script in directory.scripts():
        try:
            tree = ast.parse(script.read_bytes(), str(script))
        except (SyntaxError, ValueError, OSError):
            continue
        for node in tree.body:
            if not isinstance(node, ast.Assign) or not isinstance(node.value, ast.Constant):
                continue
            named = any(isinstance(t, ast.Name) and t.id == "revision" for t in node.targets)
            if named and isinstance(node.value.value, str):
                ids.add(node.value.value)
    return ids


def _directory_for(env: Envelope, configured: ScriptDirectory | None) -> ScriptDirectory | None:
    if configured is not None:
        return configured
    for chain in installed():
        if chain.lineage == env.lineage:
            return chain.directory()
    return None


def newer_than_chain(path: Path, env: Envelope, configured: ScriptDirectory | None) -> NewerThanChain | None:
    """The error that says the file is newer than the chain (how far, written by what), or None.

    ``configured`` is the script directory in use; None: the installed chain the envelope names.
    """
    if env.revision is None:
        return None
    try:
        directory = _directory_for(env, configured)
        if directory is None or env.revision in declared_ids(directory):
            return None
        graph = directory.load()
        if graph.knows(env.revision) or env.revision in graph.labels:
            return None
        return future_steps(path, env, graph)[2]
    except NewerThanChain as exc:
        return exc
    except BadInput:
        return None  # a broken or missing chain is reported by the commands that use it


def edited_scripts(env: Envelope, graph: RevisionGraph) -> list[dict[str, Any]]:
    """Applied revisions whose script changed since it ran on the file (its last recorded upgrade)."""
    if env.revision is None or not graph.knows(env.revision):
        return []
    last: dict[str, dict[str, Any]] = {}
    for entry in env.history:
        if entry.get("action") == "upgrade" and entry.get("script_sha256"):
            last[str(entry.get("revision"))] = entry
    out = []
    for rev in graph.order(graph.ancestors(env.revision)):
        ran = last.get(rev.id)
        now = rev.sha256()
        if ran is not None and now is not None and now != ran["script_sha256"]:
            out.append({"revision": rev.id, "script": str(rev.path), "applied_at": ran.get("at"),
                        "sha256_applied": ran["script_sha256"], "sha256_now": now})
    return out


def edited_warnings(path: Path, env: Envelope, source: ChainSource) -> list[str]:
    return [f"{path}: revision {e['revision']}'s script {e['script']} has changed since it was applied to "
            f"this file ({e['applied_at']}); the file holds what the old script did"
            for e in edited_scripts(env, source.for_envelope(env))]
