"""User story: "Two pull requests each added a migration; we merge the heads, like with Alembic."

Several heads are a state: ``heads`` lists them and says how to merge, ``upgrade`` to ``head``
stops naming them, ``--to REV`` works on either branch. ``ckptmigrate merge`` writes the merge
revision; upgrading through it applies each branch's missing revisions (branches in the order the
merge lists them), unless two branches change the same key — then it stops, naming both revisions
and the key. Downgrades walk back through a merge; ``branch_labels`` and ``depends_on`` work as in
Alembic; ``history`` draws the graph.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptmigrate import formats

Cli = Callable[..., subprocess.CompletedProcess[str]]


def script(rev: str, down: str | tuple[str, ...] | None, body: str = "    pass\n", **attrs: Any) -> str:
    lines = [f'"""Revision {rev}."""', f"revision = {rev!r}", f"down_revision = {down!r}"]
    lines += [f"{k} = {v!r}" for k, v in attrs.items()]
    return "\n".join(lines) + "\n\n\ndef upgrade(ckpt):\n" + body


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def envelope(path: Path) -> dict[str, Any]:
    env = formats.read_envelope(path)[1]
    assert env is not None
    return env


def applied(path: Path) -> list[str]:
    return [e["revision"] for e in envelope(path)["history"] if e["action"] == "upgrade"]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A project whose chain forked at r0: branch a (a1, a2) and branch b (b1, b2), disjoint keys."""
    versions = tmp_path / "migrations" / "versions"
    versions.mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text('[tool.ckptmigrate]\nmigrations = "migrations"\n')
    scripts = {
        "r0": script("r0", None),
        "a1": script("a1", "r0", "    ckpt.rename('enc.w', 'encoder.w')\n"),
        "a2": script("a2", "a1", "    ckpt.transpose('encoder.w', 0, 1)\n"),
        "b1": script("b1", "r0", "    ckpt.rename('dec.w', 'decoder.w')\n"),
        "b2": script("b2", "b1", "    ckpt.add('decoder.scale', torch.ones(1))\n").replace(
            '"""\n', '"""\nimport torch\n', 1),
    }
    for name, text in scripts.items():
        (versions / f"{name}.py").write_text(text)
    return tmp_path


def checkpoint(repo: Path, name: str = "model.pt") -> Path:
    path = repo / name
    torch.save({"enc.w": torch.arange(6.0).reshape(2, 3), "dec.w": torch.arange(4.0)}, path)
    return path


def at(cli: Cli, path: Path, rev: str) -> None:
    cli("upgrade", path, "--from", "base", "--to", rev, "--no-backup", check=True)


def test_two_heads_are_listed_with_how_to_merge_them(repo: Path, cli: Cli) -> None:
    out = cli("heads", check=True).stdout.splitlines()
    assert out == ["a2 (head) Revision a2.", "b2 (head) Revision b2.",
                   "the default lineage has 2 heads; merge them: ckptmigrate merge -m MESSAGE a2 b2"]
    rows = json.loads(cli("heads", "--json", check=True).stdout)
    assert [(r["head"], r["heads_in_lineage"]) for r in rows] == [("a2", 2), ("b2", 2)]
    cli("merge", "-m", "join", "heads", "--rev-id", "mh", check=True)
    assert "down_revision = ('a2', 'b2')" in (repo / "migrations" / "versions" / "mh_join.py").read_text()


def test_upgrade_to_head_stops_naming_the_heads_but_either_branch_can_be_reached(repo: Path, cli: Cli) -> None:
    path = checkpoint(repo)
    before = path.read_bytes()
    line = one_line_error(cli("upgrade", path, "--from", "base"))
    assert "the default lineage has 2 heads: a2 (a2.py), b2 (b2.py)" in line
    assert "ckptmigrate merge -m MESSAGE a2 b2" in line
    assert path.read_bytes() == before

    other = repo / "other.pt"
    other.write_bytes(before)
    at(cli, path, "a2")
    at(cli, other, "b2")
    assert applied(path) == ["r0", "a1", "a2"] and sorted(torch.load(path)) == ["dec.w", "encoder.w"]
    assert applied(other) == ["r0", "b1", "b2"] and "decoder.scale" in torch.load(other)
    # sideways, from one branch to the other, is no upgrade
    line = one_line_error(cli("upgrade", path, "--to", "b2"))
    assert "b2 is on another branch than a2: a2 has a1, a2 and b2 has b1, b2" in line
    assert "upgrade to a merge of both, or downgrade to a common ancestor first" in line
    # nor is a new revision on top of two heads
    assert "ckptmigrate merge -m MESSAGE a2 b2" in one_line_error(cli("revision", "-m", "next"))


def test_the_python_api_raises_errors_that_carry_the_heads(repo: Path, cli: Cli) -> None:
    from ckptmigrate import api
    from ckptmigrate.errors import MultipleHeads

    path = checkpoint(repo)
    cli("stamp", path, "--revision", "r0", check=True)
    with pytest.raises(MultipleHeads) as info:
        api.load(path, migrations=repo / "migrations")
    assert info.value.heads == ["a2", "b2"] and info.value.lineage is None


def test_merge_writes_a_revision_with_both_parents_and_upgrades_apply_each_branch(repo: Path, cli: Cli) -> None:
    out = cli("merge", "-m", "join encoder and decoder", "a2", "b2", "--rev-id", "m1", check=True).stdout
    merge_file = repo / "migrations" / "versions" / "m1_join_encoder_and_decoder.py"
    assert out.strip() == f"created {merge_file}"
    text = merge_file.read_text()
    assert "down_revision = ('a2', 'b2')" in text and "Revises: a2, b2" in text
    assert cli("heads", check=True).stdout.strip() == "m1 (head) join encoder and decoder"

    # from base: every revision, branch a whole, then branch b, then the merge (the README's order)
    fresh = checkpoint(repo)
    cli("upgrade", fresh, "--from", "base", "--no-backup", check=True)
    assert applied(fresh) == ["r0", "a1", "a2", "b1", "b2", "m1"]
    assert envelope(fresh)["revision"] == "m1"
    state = torch.load(fresh)
    assert torch.equal(state["encoder.w"], torch.arange(6.0).reshape(2, 3).T)
    assert sorted(state) == ["decoder.scale", "decoder.w", "encoder.w"]

    # a file already on branch b gets only what it lacks
    on_b = checkpoint(repo, "on_b.pt")
    at(cli, on_b, "b2")
    dry = cli("upgrade", on_b, "--dry-run", check=True).stdout
    assert "would upgrade b2 -> a1 -> a2 -> m1" in dry
    cli("upgrade", on_b, "--no-backup", check=True)
    assert applied(on_b) == ["r0", "b1", "b2", "a1", "a2", "m1"]
    assert {k: v.tolist() for k, v in torch.load(on_b).items()} == {k: v.tolist() for k, v in state.items()}

    # `heads` names them, as in Alembic; with one head left there is nothing to merge
    assert "needs exactly one lineage with several heads, not 0" in one_line_error(cli("merge", "-m", "x", "heads"))
    # the merge needs two revisions that are not each other's ancestors
    assert "a1 is an ancestor of a2: there is nothing to merge" in one_line_error(
        cli("merge", "-m", "x", "a1", "a2"))


def test_downgrade_walks_back_through_a_merge(repo: Path, cli: Cli) -> None:
    cli("merge", "-m", "join", "a2", "b2", "--rev-id", "m1", check=True)
    path = checkpoint(repo)
    original = torch.load(path)
    cli("upgrade", path, "--from", "base", "--no-backup", check=True)
    out = cli("downgrade", path, "--to", "a2", "--no-backup", check=True).stdout
    assert "downgrade m1 -> a2 (undoing m1, b2, b1)" in out
    assert envelope(path)["revision"] == "a2"
    state = torch.load(path)
    assert sorted(state) == ["dec.w", "encoder.w"]
    # and back up through the merge, then all the way down
    cli("upgrade", path, "--no-backup", check=True)
    cli("downgrade", path, "--to", "base", "--no-backup", check=True)
    back = torch.load(path)
    assert list(back) == list(original) and all(torch.equal(back[k], original[k]) for k in original)


CONFLICTS = {
    # a renames the key b still edits: b fails on it, which is reported as the conflict it is
    "renamed under the other": ("    ckpt.rename('enc.w', 'encoder.w')\n", "    ckpt.transpose('enc.w', 0, 1)\n",
                                "enc.w"),
    # both succeed, and the result would depend on the order
    "both edit one tensor": ("    ckpt.reshape('dec.w', (2, 2))\n", "    ckpt.cast('dec.w', torch.float16)\n", "dec.w"),
    # a direct edit of the state dict counts as well as an op
    "direct assignment": ("    ckpt.state_dict['dec.w'] = torch.zeros(4)\n", "    ckpt.rename('dec.w', 'decoder.w')\n",
                          "dec.w"),
}


@pytest.mark.parametrize("case", list(CONFLICTS))
@pytest.mark.parametrize("already_on_a", [False, True])
def test_branches_that_change_the_same_key_stop_the_plan(tmp_path: Path, cli: Cli, case: str,
                                                          already_on_a: bool) -> None:
    a_body, b_body, key = CONFLICTS[case]
    versions = tmp_path / "m" / "versions"
    versions.mkdir(parents=True)
    for name, text in {
        "r0": script("r0", None), "x1": script("x1", "r0", a_body), "y1": script("y1", "r0", b_body),
        "mm": script("mm", ("x1", "y1")),
    }.items():
        (versions / f"{name}.py").write_text("import torch\n" + text)
    path = checkpoint(tmp_path)
    if already_on_a:  # x1 ran in an earlier upgrade: its history entry says which keys it changed
        cli("upgrade", path, "--from", "base", "--to", "x1", "--no-backup", "--migrations", "m", check=True)
    before = path.read_bytes()
    line = one_line_error(cli("upgrade", path, "--from", "base" if not already_on_a else "x1",
                              "--migrations", "m"))
    assert f"revisions x1 (x1.py) and y1 (y1.py) are on different branches and both change {key!r}" in line
    assert path.read_bytes() == before and not path.with_name("model.pt.bak").exists()


def test_the_merge_conflict_error_carries_the_revisions_and_the_key(tmp_path: Path, cli: Cli) -> None:
    from ckptmigrate import api
    from ckptmigrate.errors import MergeConflict

    versions = tmp_path / "m" / "versions"
    versions.mkdir(parents=True)
    a_body, b_body, key = CONFLICTS["both edit one tensor"]
    for name, text in {"r0": script("r0", None), "x1": script("x1", "r0", a_body),
                       "y1": script("y1", "r0", b_body), "mm": script("mm", ("x1", "y1"))}.items():
        (versions / f"{name}.py").write_text("import torch\n" + text)
    path = checkpoint(tmp_path)
    cli("stamp", path, "--revision", "r0", "--migrations", "m", check=True)
    with pytest.raises(MergeConflict) as info:
        api.load(path, migrations=tmp_path / "m")
    assert info.value.revisions == ("x1", "y1") and info.value.key == key


def test_branch_labels_and_dependencies_across_lineages(tmp_path: Path, cli: Cli) -> None:
    """A decoder chain whose d2 needs the shared encoder's chain at e2 (labelled `enc`)."""
    versions = tmp_path / "m" / "versions"
    versions.mkdir(parents=True)
    for name, text in {
        "e1": script("e1", None, lineage="encoder", branch_labels=("enc",)),
        "e2": script("e2", "e1", "    ckpt.rename('encoder.w', 'encoder.weight')\n"),
        "d1": script("d1", None, lineage="decoder"),
        "d2": script("d2", "d1", "    ckpt.rename('head.w', 'head.weight')\n", depends_on="e2"),
    }.items():
        (versions / f"{name}.py").write_text(text)
    path = tmp_path / "seq2seq.pt"
    torch.save({"encoder.w": torch.ones(2), "head.w": torch.zeros(2)}, path)
    cli("upgrade", path, "--from", "d1", "--no-backup", "--migrations", "m", check=True)
    # d2 needs e2, so the encoder's chain runs first, inside the decoder's lineage
    assert applied(path) == ["e1", "e2", "d2"]
    assert envelope(path)["lineage"] == "decoder" and envelope(path)["revision"] == "d2"
    assert sorted(torch.load(path)) == ["encoder.weight", "head.weight"]
    cli("downgrade", path, "--to", "d1", "--no-backup", "--migrations", "m", check=True)
    assert sorted(torch.load(path)) == ["encoder.w", "head.w"]

    enc = tmp_path / "encoder.pt"
    torch.save({"encoder.w": torch.ones(2)}, enc)
    cli("upgrade", enc, "--from", "base", "--to", "enc@head", "--lineage", "encoder", "--no-backup",
        "--migrations", "m", check=True)
    assert envelope(enc)["revision"] == "e2"
    heads = cli("heads", "--migrations", "m", check=True).stdout.splitlines()
    assert "e2 (head, lineage encoder, branch enc) Revision e2." in heads
    history = json.loads(cli("history", "--json", "--migrations", "m", check=True).stdout)
    assert {r["revision"]: r["depends_on"] for r in history}["d2"] == ["e2"]


def test_history_draws_the_graph(repo: Path, cli: Cli) -> None:
    cli("merge", "-m", "join", "a2", "b2", "--rev-id", "m1", check=True)
    lines = cli("history", "--graph", check=True).stdout.splitlines()
    assert lines == [
        "*  m1 (head, merge a2 + b2) join",
        "|\\",
        "| *  b2 Revision b2.",
        "| *  b1 Revision b1.",
        "* |  a2 Revision a2.",
        "* |  a1 Revision a1.",
        "|/",
        "*  r0 (branch point) Revision r0.",
    ]
    plain = cli("history", check=True).stdout.splitlines()
    assert plain[0] == "a2, b2 -> m1  join"
    rows = json.loads(cli("history", "--json", check=True).stdout)
    assert rows[0]["down_revisions"] == ["a2", "b2"] and rows[0]["merge"] is True
    dot = cli("history", "--dot", check=True).stdout
    assert dot.startswith("digraph revisions {")
    for edge in ('"a2" -> "m1"', '"b2" -> "m1"', '"r0" -> "a1"', '"r0" -> "b1"'):
        assert edge in dot
