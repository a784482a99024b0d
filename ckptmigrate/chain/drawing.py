"""The revision graph drawn for people: ASCII lanes like ``git log --graph``, and Graphviz ``dot``.

Newest first: a merge opens a lane per extra parent (``|\\``); where two branches started from one
revision their lanes close into it (``|/``). Dependencies on other lineages are written beside the
revision (``needs enc3``) rather than drawn, so each lineage keeps its own lanes.
"""

from __future__ import annotations

import json

from ckptmigrate.chain.revisions import Revision, RevisionGraph


def describe(rev: Revision, graph: RevisionGraph) -> str:
    """``id (head, merge, branch: enc) message  needs X``."""
    tags = []
    if not rev.children:
        tags.append("head")
    if rev.is_merge:
        tags.append("merge " + " + ".join(rev.downs))
    if len(rev.children) > 1:
        tags.append("branch point")
    if rev.branch_labels:
        tags.append("branch: " + ", ".join(rev.branch_labels))
    if rev.lineage:
        tags.append(f"lineage {rev.lineage}")
    text = rev.id + (f" ({', '.join(tags)})" if tags else "") + (f" {rev.message}" if rev.message else "")
    if rev.dependencies:
        text += "  needs " + ", ".join(rev.dependencies)
    return text


def _cells(lanes: list[str], marks: dict[int, str]) -> str:
    return " ".join(marks.get(i, "|") for i in range(len(lanes)))


def _line(marks: dict[int, str]) -> str:
    """Characters at positions (lane i sits at 2i, a lane moving left or right by one at 2i-1 / 2i+1)."""
    width = max(marks) + 1
    return "".join(marks.get(i, " ") for i in range(width)).rstrip()


def ascii_lines(graph: RevisionGraph) -> list[str]:
    """One line per revision, newest first, with lanes; lineages one after another."""
    lines: list[str] = []
    for lin in graph.lineages():
        if lines:
            lines.append("")
        lanes: list[str] = []
        for rev in reversed(graph.chain(lin)):
            cols = [i for i, lane in enumerate(lanes) if lane == rev.id]
            if not cols:
                lanes.append(rev.id)
                cols = [len(lanes) - 1]
            col, closing = cols[0], cols[1:]
            if closing:  # branches that started here close into one lane: |/
                first = closing[0]
                lines.append(_line({**{2 * i: "|" for i in range(first) if i not in closing},
                                    **{2 * i - 1: "/" for i in range(first, len(lanes))}}))
                lanes = [lane for i, lane in enumerate(lanes) if i not in closing]
            lines.append(f"{_cells(lanes, {col: '*'})}  {describe(rev, graph)}")
            if not rev.downs:
                del lanes[col]
                if col < len(lanes):
                    lines.append(_line({**{2 * i: "|" for i in range(col)},
                                        **{2 * i + 1: "/" for i in range(col, len(lanes))}}))
                continue
            lanes[col] = rev.downs[0]
            extra = [p for p in rev.downs[1:] if p not in lanes]
            if extra:  # a merge opens a lane per extra parent: |\
                lines.append(_line({**{2 * i: "|" for i in range(col + 1)},
                                    **{2 * i + 1: "\\" for i in range(col, len(lanes))}}))
                lanes[col + 1 : col + 1] = extra
    return lines


def dot(graph: RevisionGraph) -> str:
    """Graphviz: an edge from each parent to its child; dashed edges for ``depends_on``; one
    cluster per lineage."""
    out = ["digraph revisions {", "  rankdir=BT;", '  node [shape=box, fontname="monospace"];']
    for n, lin in enumerate(graph.lineages()):
        out.append(f"  subgraph cluster_{n} {{")
        out.append(f"    label={json.dumps(f'lineage {lin}' if lin else 'default lineage')};")
        for rev in graph.chain(lin):
            label = rev.id + (f"\n{rev.message}" if rev.message else "")
            if rev.branch_labels:
                label += f"\n[{', '.join(rev.branch_labels)}]"
            style = ", peripheries=2" if not rev.children else ""
            out.append(f"    {json.dumps(rev.id)} [label={json.dumps(label)}{style}];")
        out.append("  }")
    for rev in graph.revisions.values():
        for parent in rev.downs:
            out.append(f"  {json.dumps(parent)} -> {json.dumps(rev.id)};")
        for dep in rev.dependencies:
            out.append(f'  {json.dumps(dep)} -> {json.dumps(rev.id)} [style=dashed, label="depends_on"];')
    out.append("}")
    return "\n".join(out) + "\n"
