"""User story: "I run ``ckptmigrate upgrade`` on my old checkpoints and they load into today's model."

End to end, as subprocesses on real files: the example model's 6-revision chain takes an era-1
checkpoint (``nn.DataParallel``, fused qkv) to today's layout in place, keeping a backup that a
later run never overwrites, and the new model computes what the old one did; ``downgrade`` gives
the original back bit for bit. ``--dry-run`` writes nothing, ``-o`` leaves the input alone, a file
already at head is not touched, many paths/directories/globs go through even when one file is bad,
unstamped files are placed by their schema or ``--from``, a failing migration leaves the original
byte-identical and says where it failed, safetensors stay safetensors, and a real legacy file saved
on CUDA (LPIPS) is migrated too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import ckptmigrate
from ckptmigrate import api, formats
from ckptmigrate.example import IN_FEATURES, current_model, model_at

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = str(ROOT / "migrations")
HEAD_PLAN = "0001 -> 0002 -> 0003 -> 0004 -> 0005 -> 0006"
Cli = Callable[..., subprocess.CompletedProcess[str]]


def save_era(path: Path, era: int, *, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = model_at(era)
    if path.suffix == ".safetensors":
        save_file(model.state_dict(), str(path))
    else:
        torch.save(model.state_dict(), path)
    return model


def fingerprint(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def listing(directory: Path) -> list[str]:
    """The files under ``directory``, less the bytecode Python caches for imported migration scripts
    (written where ``PYTHONDONTWRITEBYTECODE`` is unset, by Python, not by ckptmigrate)."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if "__pycache__" not in p.parts)


def revision_of(path: Path) -> str | None:
    envelope = formats.read_envelope(path)[1]
    return None if envelope is None else envelope["revision"]


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for k, w in want.items():
        assert got[k].dtype == w.dtype and got[k].shape == w.shape, k
        assert torch.equal(got[k], w), k


@pytest.fixture
def renames(tmp_path: Path) -> Path:
    """A cheap chain of renames (no tensor is computed): c1 (base) → c2 (a→b) → c3 (b→c)."""
    versions = tmp_path / "chain" / "versions"
    versions.mkdir(parents=True)
    for rev, down, body in (("c1", None, "pass"), ("c2", "c1", "ckpt.rename('a', 'b')"),
                            ("c3", "c2", "ckpt.rename('b', 'c')")):
        (versions / f"{rev}.py").write_text(
            f'"""Revision {rev}."""\nrevision = {rev!r}\ndown_revision = {down!r}\n\n\n'
            f"def upgrade(ckpt):\n    {body}\n"
        )
    return versions.parent


def small(path: Path, first: str = "a") -> Path:
    torch.save({first: torch.arange(6.0).reshape(2, 3), "other": torch.ones(2, dtype=torch.int64)}, path)
    return path


# -- the example chain ---------------------------------------------------------------------------


def test_an_era_1_checkpoint_upgraded_in_place_computes_the_same_and_walks_back(tmp_path: Path, cli: Cli) -> None:
    path = tmp_path / "old.pth"
    old_model = save_era(path, 1)
    original_bytes = path.read_bytes()
    original = torch.load(path)
    assert next(iter(original)).startswith("module.")

    proc = cli("upgrade", "old.pth", "--migrations", EXAMPLE, check=True)
    assert proc.stdout.strip() == f"old.pth: upgrade {HEAD_PLAN} (backup: old.pth.bak)"
    assert (tmp_path / "old.pth.bak").read_bytes() == original_bytes
    assert cli("current", "old.pth").stdout.strip() == "0006"
    upgraded = torch.load(path, mmap=True)
    assert list(upgraded) == list(current_model().state_dict())  # the model's own key order

    new_model = current_model()
    report = ckptmigrate.load_state_dict(new_model, path, migrations=EXAMPLE)
    assert report.ok and report.applied == []
    x = torch.randn(7, IN_FEATURES)
    with torch.no_grad():
        torch.testing.assert_close(new_model(x), old_model(x))

    cli("downgrade", "old.pth", "--to", "0001", "-o", "down.pth", "--migrations", EXAMPLE, check=True)
    assert revision_of(tmp_path / "down.pth") == "0001"
    assert_same_tensors(torch.load(tmp_path / "down.pth"), original)
    assert (tmp_path / "old.pth.bak").read_bytes() == original_bytes


def test_dry_run_lists_each_revisions_ops_and_writes_nothing(tmp_path: Path, cli: Cli) -> None:
    save_era(tmp_path / "era1.pth", 1)
    save_era(tmp_path / "era3.pth", 3)
    before = {p: fingerprint(tmp_path / p) for p in ("era1.pth", "era3.pth")}
    files = listing(tmp_path)

    proc = cli("upgrade", "--dry-run", "era1.pth", "era3.pth", "--migrations", EXAMPLE, check=True)
    lines = proc.stdout.splitlines()
    era3 = lines.index("era3.pth: would upgrade 0003 -> 0004 -> 0005 -> 0006 (start from schema)")
    assert lines[0] == f"era1.pth: would upgrade {HEAD_PLAN} (start from schema)"
    # per revision its ops, each with the keys it touches grouped by module prefix (not just counts)
    headers = [line.strip() for line in lines[1:era3] if line.startswith("    ") and not line.startswith("      ")]
    assert headers == ["0002:", "0003:", "0004:", "0005:", "0006:"]
    ops = [line.strip() for line in lines[1:era3] if line.startswith("      ") and not line.startswith("        ")]
    assert ops == ["unwrap (24 keys)", "rename_prefix (20 keys)", *["split (4 keys)"] * 4, "reshape (1 key)",
                   "add (1 key)"]
    assert "        module.blocks.{0,1}.attn.{proj,qkv}.{bias,weight}" in lines[:era3]
    assert "        temperature" in lines[:era3]
    assert listing(tmp_path) == files
    assert {p: fingerprint(tmp_path / p) for p in before} == before


def test_many_paths_directories_and_globs_with_one_bad_file(tmp_path: Path, cli: Cli) -> None:
    (tmp_path / "ckpts" / "nested").mkdir(parents=True)
    save_era(tmp_path / "ckpts" / "era1.pth", 1, seed=1)
    save_era(tmp_path / "ckpts" / "nested" / "era2.ckpt", 2, seed=2)
    (tmp_path / "ckpts" / "notes.txt").write_text("not a checkpoint suffix: skipped")
    save_era(tmp_path / "g_a.pt", 4, seed=3)
    save_era(tmp_path / "g_b.pt", 5, seed=4)
    st_model = save_era(tmp_path / "era1.safetensors", 1, seed=5)
    (tmp_path / "bad.pth").write_bytes(b"definitely not a checkpoint\n")
    bad = fingerprint(tmp_path / "bad.pth")

    proc = cli("upgrade", "ckpts", "g_*.pt", "bad.pth", "era1.safetensors", "--migrations", EXAMPLE)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "bad.pth: FAILED: bad.pth: not a checkpoint (neither a torch zip, a legacy torch " \
                                  "file nor safetensors)"
    assert proc.stdout.splitlines()[-1] == "6 files: 5 written, 0 unchanged, 1 failed"
    assert fingerprint(tmp_path / "bad.pth") == bad

    want = list(current_model().state_dict())
    for name in ("ckpts/era1.pth", "ckpts/nested/era2.ckpt", "g_a.pt", "g_b.pt"):
        assert revision_of(tmp_path / name) == "0006", name
        assert list(torch.load(tmp_path / name)) == want, name
        assert (tmp_path / f"{name}.bak").exists(), name

    # safetensors in, safetensors out: loads with safetensors itself into today's model
    st = tmp_path / "era1.safetensors"
    assert formats.read(st).format == "safetensors"
    assert revision_of(st) == "0006"
    model = current_model()
    model.load_state_dict(load_file(str(st)))
    x = torch.randn(3, IN_FEATURES)
    with torch.no_grad():
        torch.testing.assert_close(model(x), st_model(x))


# -- in place, -o, already at head ---------------------------------------------------------------


def test_backups_are_kept_and_never_clobbered(tmp_path: Path, cli: Cli, renames: Path) -> None:
    path = small(tmp_path / "model.pt")
    original = path.read_bytes()
    chain = ("--migrations", "chain")
    out = cli("upgrade", "model.pt", "--from", "c1", "--to", "c2", *chain, check=True).stdout
    assert out.strip() == "model.pt: upgrade c1 -> c2 (backup: model.pt.bak)"
    cli("upgrade", "model.pt", *chain, check=True)
    cli("downgrade", "model.pt", "--to", "c1", *chain, check=True)
    cli("upgrade", "model.pt", "--no-backup", *chain, check=True)

    assert (tmp_path / "model.pt.bak").read_bytes() == original
    assert [revision_of(tmp_path / f"model.pt.bak.{n}") for n in (1, 2)] == ["c2", "c3"]
    assert list(torch.load(tmp_path / "model.pt.bak.1")) == ["b", "other"]
    assert not (tmp_path / "model.pt.bak.3").exists()
    assert revision_of(path) == "c3" and list(torch.load(path)) == ["c", "other"]


def test_output_file_leaves_the_input_alone(tmp_path: Path, cli: Cli, renames: Path) -> None:
    path = small(tmp_path / "model.pt")
    before = fingerprint(path)
    (tmp_path / "out").mkdir()
    cli("upgrade", "model.pt", "--from", "c1", "-o", "out/new.pt", "--migrations", "chain", check=True)
    assert fingerprint(path) == before and not (tmp_path / "model.pt.bak").exists()
    assert list(torch.load(tmp_path / "out" / "new.pt")) == ["c", "other"]
    assert revision_of(tmp_path / "out" / "new.pt") == "c3"

    small(tmp_path / "second.pt")
    proc = cli("upgrade", "model.pt", "second.pt", "--from", "c1", "-o", "x.pt", "--migrations", "chain")
    assert proc.returncode == 2 and "-o/--output takes exactly one input file" in proc.stderr
    proc = cli("upgrade", "model.pt", "--in-place", "-o", "x.pt", "--migrations", "chain")
    assert proc.returncode == 2 and "--in-place and -o/--output exclude each other" in proc.stderr
    assert not (tmp_path / "x.pt").exists()


def test_a_file_already_at_head_is_left_untouched(tmp_path: Path, cli: Cli, renames: Path) -> None:
    path = small(tmp_path / "model.pt")
    cli("upgrade", "model.pt", "--from", "c1", "--no-backup", "--migrations", "chain", check=True)
    before, files = fingerprint(path), listing(tmp_path)
    proc = cli("upgrade", "model.pt", "--migrations", "chain", check=True)
    assert proc.stdout.strip() == "model.pt: already at c3, left untouched"
    assert fingerprint(path) == before and listing(tmp_path) == files

    proc = cli("upgrade", "model.pt", "-o", "copy.pt", "--migrations", "chain", check=True)

    assert proc.stdout.strip() == "model.pt: already at c3, left untouched, copied to copy.pt"
    assert fingerprint(path) == before
    assert cli("current", "copy.pt", check=True).stdout.strip() == "c3"
    for k, v in torch.load(path, weights_only=True).items():
        assert torch.equal(torch.load(tmp_path / "copy.pt", weights_only=True)[k], v)


def test_current_shows_the_revision_or_unstamped(tmp_path: Path, cli: Cli, renames: Path) -> None:
    small(tmp_path / "raw.pt")
    small(tmp_path / "done.pt")
    cli("upgrade", "done.pt", "--from", "c1", "--to", "c2", "--migrations", "chain", check=True)
    assert cli("current", "raw.pt").stdout.strip() == "unstamped"
    assert cli("current", "done.pt", "raw.pt").stdout.splitlines() == ["done.pt: c2", "raw.pt: unstamped"]
    rows = json.loads(cli("current", "done.pt", "raw.pt", "--json").stdout)
    assert [(r["path"], r["revision"], r["stamped"]) for r in rows] == [("done.pt", "c2", True),
                                                                       ("raw.pt", None, False)]


def test_an_unstamped_file_needs_a_schema_match_or_from(tmp_path: Path, cli: Cli, renames: Path) -> None:
    path = small(tmp_path / "model.pt", first="b")  # as c2 left it, but never stamped
    proc = cli("upgrade", "model.pt", "--migrations", "chain")
    assert proc.returncode == 2 and "pass --from REV" in proc.stderr
    proc = cli("upgrade", "model.pt", "--from", "c9", "--migrations", "chain")
    assert proc.returncode == 2 and "unknown revision 'c9'" in proc.stderr
    cli("upgrade", "model.pt", "--from", "c2", "--migrations", "chain", check=True)
    assert list(torch.load(path)) == ["c", "other"] and revision_of(path) == "c3"


def test_an_unstamped_file_is_placed_by_the_schema_snapshots(tmp_path: Path, cli: Cli, renames: Path) -> None:
    for rev, first in (("c1", "a"), ("c2", "b"), ("c3", "c")):
        schema = {first: {"shape": [2, 3], "dtype": "float32"}, "other": {"shape": [2], "dtype": "int64"}}
        (renames / "versions" / f"{rev}.schema.json").write_text(json.dumps(schema))
    path = small(tmp_path / "model.pt", first="b")
    proc = cli("upgrade", "model.pt", "--dry-run", "--migrations", "chain", check=True)
    assert proc.stdout.splitlines()[0] == "model.pt: would upgrade c2 -> c3 (start from schema)"
    small(tmp_path / "odd.pt", first="zzz")
    proc = cli("upgrade", "odd.pt", "--migrations", "chain")
    assert proc.returncode == 2
    assert "its schema matches no revision; nearest is c1 (missing ['a']; unexpected ['zzz'])" in proc.stderr
    assert revision_of(path) is None


# -- a migration that fails ----------------------------------------------------------------------


@pytest.mark.parametrize("body, where", [
    ("ckpt.rename('missing.weight', 'x')", "upgrade failed in rename on 'missing.weight': rename: 'missing.weight' "
                                           "matches no key"),
    ("ckpt.split('other', ['x', 'y'], sizes=[1, 5])", "upgrade failed in split on 'other': split: sizes [1, 5] do "
                                                      "not add up to 2"),
    ("raise RuntimeError('the script itself is broken')", "upgrade raised RuntimeError: the script itself is broken"),
])
def test_a_failing_migration_writes_nothing_and_says_where(tmp_path: Path, cli: Cli, renames: Path, body: str,
                                                           where: str) -> None:
    script = renames / "versions" / "c4.py"
    script.write_text(f'"""Broken."""\nrevision = "c4"\ndown_revision = "c3"\n\n\ndef upgrade(ckpt):\n    {body}\n')
    path = small(tmp_path / "model.pt")
    before, files = fingerprint(path), listing(tmp_path)
    proc = cli("upgrade", "model.pt", "--from", "c1", "--migrations", "chain")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith(f"ckptmigrate: error: model.pt: revision c4 ({script}) {where}")
    assert fingerprint(path) == before and listing(tmp_path) == files


def test_an_irreversible_revision_needs_a_written_downgrade(tmp_path: Path, cli: Cli, renames: Path) -> None:
    script = renames / "versions" / "c4.py"
    script.write_text('"""Drop other."""\nrevision = "c4"\ndown_revision = "c3"\n\n\n'
                      'def upgrade(ckpt):\n    ckpt.drop("other")\n')
    path = small(tmp_path / "model.pt")
    cli("upgrade", "model.pt", "--from", "c1", "--no-backup", "--migrations", "chain", check=True)
    assert list(torch.load(path)) == ["c"]
    before, files = fingerprint(path), listing(tmp_path)
    proc = cli("downgrade", "model.pt", "--to", "c1", "--migrations", "chain")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"revision c4 ({script}) has no downgrade() and the checkpoint's history holds no invertible record" \
           in proc.stderr
    assert fingerprint(path) == before and listing(tmp_path) == files

    # with a downgrade() it walks back: the written one for c4, the recorded inverses for c3 and c2
    script.write_text(script.read_text() + "\n\ndef downgrade(ckpt):\n"
                      "    import torch\n    ckpt.add('other', torch.full((2,), 5))\n")
    cli("downgrade", "model.pt", "--to", "c1", "--migrations", "chain", check=True)
    restored = torch.load(path)
    assert list(restored) == ["a", "other"] and revision_of(path) == "c1"
    assert torch.equal(restored["other"], torch.full((2,), 5))
    assert torch.equal(restored["a"], torch.arange(6.0).reshape(2, 3))


# -- a real file: LPIPS, legacy format, saved on CUDA ---------------------------------------------


def test_the_real_lpips_file_saved_on_cuda_in_the_legacy_format(tmp_path: Path, cli: Cli,
                                                                real_file: Callable[[str], Path]) -> None:
    path = real_file("lpips-v0.1-alex.pth")
    original = torch.load(path, map_location="cpu")
    assert formats.read(path).format == "torch-legacy"
    versions = tmp_path / "lpips_migrations" / "versions"
    versions.mkdir(parents=True)
    (versions / "l1_conv.py").write_text(
        '"""The lin layers lose their Sequential: linN.model.1 becomes linN.conv."""\n'
        'revision = "l1"\ndown_revision = None\n\n\ndef upgrade(ckpt):\n'
        '    ckpt.rename_regex(r"lin(\\d)\\.model\\.1\\.weight", r"lin\\1.conv.weight")\n'
    )
    proc = cli("upgrade", path.name, "--from", "base", "--migrations", "lpips_migrations", check=True)
    assert proc.stdout.strip() == f"{path.name}: upgrade base -> l1 (backup: {path.name}.bak)"
    assert cli("current", path.name).stdout.strip() == "l1"

    info: dict[str, Any] = api.inspect(path)
    assert info["container"] == "torch-zip" and info["devices"] == ["cuda:0"]  # where they were saved
    migrated = torch.load(path, map_location="cpu")
    assert list(migrated) == [f"lin{i}.conv.weight" for i in range(5)]
    for i in range(5):
        assert torch.equal(migrated[f"lin{i}.conv.weight"], original[f"lin{i}.model.1.weight"])
    assert formats.read(path.with_name(path.name + ".bak")).format == "torch-legacy"


# -- a migration that needs the real objects in the extras ---------------------------------------


def test_trust_pickle_gives_migrations_the_real_extras(tmp_path: Path, cli: Cli, renames: Path) -> None:
    """The hyper-parameters are an ``argparse.Namespace``: without ``--trust-pickle`` the migration
    sees an inert stand-in and fails cleanly; with it, the file's pickle runs and the migration can
    read and change the real object, which is written back as one."""
    (renames / "versions" / "c4.py").write_text(
        '"""Scale the learning rate."""\nrevision = "c4"\ndown_revision = "c3"\n\n\n'
        "def upgrade(ckpt):\n    ckpt.extras['args'].lr *= 10\n"
    )
    path = tmp_path / "model.pt"
    torch.save({"model": {"a": torch.arange(6.0)}, "args": argparse.Namespace(lr=0.5, width=8)}, path)
    before, files = fingerprint(path), listing(tmp_path)

    refused = cli("upgrade", "model.pt", "--from", "c1", "--migrations", "chain")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "revision c4" in refused.stderr and "upgrade raised AttributeError" in refused.stderr
    assert fingerprint(path) == before and listing(tmp_path) == files

    cli("upgrade", "model.pt", "--from", "c1", "--trust-pickle", "--no-backup", "--migrations", "chain", check=True)
    upgraded = torch.load(path, weights_only=False)
    assert upgraded["args"] == argparse.Namespace(lr=5.0, width=8)
    assert list(upgraded["model"]) == ["c"] and torch.equal(upgraded["model"]["c"], torch.arange(6.0))
    assert revision_of(path) == "c4"
