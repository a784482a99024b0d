"""User story: "renaming the keys of a big checkpoint took milliseconds, and it still loads exactly as before."

A chain that only renames rewrites metadata: in place it appends a new ``data.pkl``, envelope and
directory to the file (every byte of the original stays where it was); out of place the tensor
records are copied by the kernel. ``compact`` then drops the orphaned bytes. Each fast path must
give bit for bit the tensors the slow path (``torch.load`` → edit → compare) gives, through
``torch.load`` with and without ``mmap``. A chain that splits and reshapes streams one tensor at a
time: its private memory stays far below the size of the file.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptmigrate import api
from ckptmigrate.formats import torchzip

Cli = Callable[..., subprocess.CompletedProcess[str]]
LAYER_TENSORS = {
    "ln_1.weight": lambda d: (d,), "ln_1.bias": lambda d: (d,),
    "attn.c_attn.weight": lambda d: (3 * d, d), "attn.c_attn.bias": lambda d: (3 * d,),
    "attn.c_proj.weight": lambda d: (d, d), "attn.c_proj.bias": lambda d: (d,),
    "ln_2.weight": lambda d: (d,), "ln_2.bias": lambda d: (d,),
    "mlp.c_fc.weight": lambda d: (4 * d, d), "mlp.c_fc.bias": lambda d: (4 * d,),
    "mlp.c_proj.weight": lambda d: (d, 4 * d), "mlp.c_proj.bias": lambda d: (d,),
}


def gpt_like(layers: int, d: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A GPT-2-shaped state dict saved under ``nn.DataParallel`` (every key under ``module.``)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {"module.wte.weight": torch.randn(64, d, generator=gen),
          "module.wpe.weight": torch.randn(16, d, generator=gen)}
    for i in range(layers):
        for name, shape in LAYER_TENSORS.items():
            sd[f"module.h.{i}.{name}"] = torch.randn(shape(d), generator=gen)
    sd["module.ln_f.weight"] = torch.ones(d)
    sd["module.ln_f.bias"] = torch.zeros(d)
    return sd


RENAME = """
revision = "r1"
down_revision = None


def upgrade(ckpt):
    ckpt.unwrap("module.")
    ckpt.rename_regex(r"h\\.(\\d+)\\.(.+)", r"layers.\\1.\\2")
"""

SPLIT = """
revision = "r2"
down_revision = "r1"


def upgrade(ckpt):
    ckpt.split(r"layers\\.(\\d+)\\.attn\\.c_attn\\.(weight|bias)",
               [r"layers.\\1.attn.q.\\2", r"layers.\\1.attn.k.\\2", r"layers.\\1.attn.v.\\2"])
    ckpt.reshape(r"layers\\.\\d+\\.mlp\\.c_fc\\.weight", [-1, %d, 1])
"""


def renamed(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The slow path of the rename chain: edit the keys of a fully loaded state dict."""
    return {re.sub(r"^h\.(\d+)\.", r"layers.\1.", k.removeprefix("module.")): v for k, v in sd.items()}


def split_and_reshaped(sd: dict[str, torch.Tensor], d: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in renamed(sd).items():
        m = re.fullmatch(r"layers\.(\d+)\.attn\.c_attn\.(weight|bias)", k)
        if m:
            for part, chunk in zip("qkv", v.chunk(3, dim=0), strict=True):
                out[f"layers.{m[1]}.attn.{part}.{m[2]}"] = chunk
        elif re.fullmatch(r"layers\.\d+\.mlp\.c_fc\.weight", k):
            out[k] = v.reshape(-1, d, 1)
        else:
            out[k] = v
    return out


def chain(root: Path, *, split_dim: int | None = None) -> Path:
    versions = root / "migrations" / "versions"
    versions.mkdir(parents=True)
    (versions / "r1_rename.py").write_text(RENAME)
    if split_dim is not None:
        (versions / "r2_split.py").write_text(SPLIT % split_dim)
    return root / "migrations"


def assert_bit_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for k, v in want.items():
        g = got[k]
        assert (g.dtype, g.shape) == (v.dtype, v.shape), k
        assert g.contiguous().view(torch.uint8).equal(v.contiguous().view(torch.uint8)), k


def assert_loads_as(path: Path, want: dict[str, torch.Tensor]) -> None:
    for mmap in (False, True):
        assert_bit_identical(torch.load(path, mmap=mmap, weights_only=True), want)


def sha256(path: Path, limit: int | None = None) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read(limit) if limit is not None else fh.read()).hexdigest()


@pytest.fixture
def big(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """300 tensors: enough metadata that a careless envelope would not fit the in-place window."""
    sd = gpt_like(layers=24, d=16)
    path = tmp_path / "gpt.pt"
    torch.save(sd, path)
    return path, sd


def test_rename_chain_appends_in_place_and_keeps_every_original_byte(
    tmp_path: Path, cli: Cli, big: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    path, sd = big
    migrations = chain(tmp_path)
    before = path.stat()
    original = sha256(path)

    cli("upgrade", path, "--from", "base", "--no-backup", "--migrations", migrations, check=True)

    after = path.stat()
    assert after.st_ino == before.st_ino, "the file was replaced, not appended to"
    assert 0 < after.st_size - before.st_size < 64 * 1024
    assert sha256(path, before.st_size) == original, "bytes of the original changed"
    assert_loads_as(path, renamed(sd))
    assert api.inspect(path)["envelope"]["revision"] == "r1"
    assert not list(tmp_path.glob(".*ckptmigrate*")), "a temporary or lock file was left behind"


def test_a_backup_is_a_hard_link_so_the_upgraded_file_is_a_new_one(
    tmp_path: Path, cli: Cli, big: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    """Where the filesystem cannot clone (ext4, tmpfs), the backup costs no copy: it is the
    original's inode, which therefore must not be appended to — the result is a new file."""
    path, sd = big
    before = path.stat()
    original = sha256(path)

    cli("upgrade", path, "--from", "base", "--migrations", chain(tmp_path), check=True)

    backup = path.with_name(path.name + ".bak")
    if backup.stat().st_ino != before.st_ino:
        pytest.skip("this filesystem cloned the backup (copy-on-write): see the XFS test")
    assert sha256(backup) == original and backup.stat().st_size == before.st_size
    assert path.stat().st_ino != before.st_ino, "the upgrade wrote into the backup's inode"
    assert_loads_as(path, renamed(sd))


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    """A 300 MiB XFS filesystem with reflink, on a loop device; skipped where it cannot be made."""
    image, mountpoint = tmp_path / "xfs.img", tmp_path / "xfs"
    mountpoint.mkdir()
    with open(image, "wb") as fh:
        fh.truncate(300 << 20)
    try:
        made = subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)], capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("mkfs.xfs is not installed (xfsprogs)")
    if made.returncode != 0:
        pytest.skip(f"mkfs.xfs failed: {made.stderr.strip()}")
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a loop device here ({mounted.stderr.strip() or mounted.returncode})")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], capture_output=True)


def test_on_a_copy_on_write_filesystem_the_backup_is_a_clone_and_the_upgrade_appends(
    xfs: Path, cli: Cli, big: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    """On XFS (or btrfs) the default in-place upgrade is O(metadata) *with* its backup: the backup
    is a copy-on-write clone, a file of its own, so the original is appended to in place."""
    source, sd = big
    path = xfs / source.name
    path.write_bytes(source.read_bytes())
    before = path.stat()
    original = sha256(path)

    cli("upgrade", path, "--from", "base", "--migrations", chain(xfs), check=True)

    backup = path.with_name(path.name + ".bak")
    assert backup.stat().st_ino != before.st_ino and backup.stat().st_nlink == 1, "the backup is not a clone"
    assert sha256(backup) == original
    assert path.stat().st_ino == before.st_ino, "the file was replaced, not appended to"
    assert sha256(path, before.st_size) == original, "bytes of the original changed"
    assert_loads_as(path, renamed(sd))
    assert_loads_as(backup, sd)
    assert sorted(p.name for p in xfs.iterdir()) == sorted([path.name, backup.name, "migrations"])


def test_out_of_place_rename_copies_records_and_equals_the_slow_path(
    tmp_path: Path, cli: Cli, big: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    path, sd = big
    original = sha256(path)
    out = tmp_path / "out.pt"

    cli("upgrade", path, "--from", "base", "-o", out, "--migrations", chain(tmp_path), check=True)

    assert sha256(path) == original
    assert_loads_as(out, renamed(sd))


def test_compact_after_several_appends_drops_the_orphans_and_keeps_every_tensor(
    tmp_path: Path, cli: Cli, big: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    path, sd = big
    cli("upgrade", path, "--from", "base", "--no-backup", "--migrations", chain(tmp_path), check=True)
    for run in range(3):
        cli("stamp", path, "--tag", f"run={run}", check=True)
    grown = path.stat().st_size
    envelope = api.inspect(path)["envelope"]

    cli("compact", path, check=True)

    fresh = tmp_path / "fresh.pt"
    torch.save(renamed(sd), fresh)
    assert path.stat().st_size < grown
    # what remains over a plain torch.save of the same tensors is the envelope record
    assert path.stat().st_size - fresh.stat().st_size < 16 * 1024
    assert_loads_as(path, renamed(sd))
    assert api.inspect(path)["envelope"] == envelope
    assert [h["tags"] for h in envelope["history"] if h["action"] == "stamp"] == [{"run": str(r)} for r in range(3)]


def test_downgrade_of_an_appended_file_gives_back_the_original_tensors(
    tmp_path: Path, cli: Cli, big: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    path, sd = big
    migrations = chain(tmp_path)
    cli("upgrade", path, "--from", "base", "--no-backup", "--migrations", migrations, check=True)

    cli("downgrade", path, "--to", "base", "--no-backup", "--migrations", migrations, check=True)

    assert_loads_as(path, sd)


def test_safetensors_rename_equals_the_slow_path(tmp_path: Path, cli: Cli) -> None:
    sd = gpt_like(layers=4, d=16)
    path = tmp_path / "gpt.safetensors"
    save_file(sd, path)
    original = sha256(path)
    out = tmp_path / "out.safetensors"

    cli("upgrade", path, "--from", "base", "-o", out, "--migrations", chain(tmp_path), check=True)

    assert sha256(path) == original
    got = load_file(out)
    want = renamed(sd)
    assert_bit_identical({k: got[k] for k in want}, want)
    assert set(got) == set(want)


def test_the_envelope_record_is_compressed_only_when_large() -> None:
    small = {"format_version": 1, "tags": {"a": "b"}}
    large = {"format_version": 1, "schema": {f"layer.{i}.weight": {"shape": [i, 4], "dtype": "float32"}
                                             for i in range(500)}}
    assert torchzip.envelope_bytes(small).startswith(b"{")
    packed = torchzip.envelope_bytes(large)
    assert packed[:1] == b"\x78" and len(packed) < len(str(large)) / 4
    assert torchzip.parse_envelope(packed) == large
    assert torchzip.parse_envelope(torchzip.envelope_bytes(small)) == small


CHILD = textwrap.dedent("""
    import sys
    from ckptmigrate.cli import main
    main(sys.argv[1:], prog_name="ckptmigrate")
""")


def peak_anon_mib(args: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run a child and sample its private (anonymous) memory from /proc every 2 ms."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        status = Path(f"/proc/{proc.pid}/status")
        while not done.is_set():
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]))
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, err = proc.communicate(timeout=300)
    done.set()
    sampler.join()
    return peak / 1024, subprocess.CompletedProcess(args, proc.returncode, out, err)


def test_a_split_chain_streams_a_file_many_times_larger_than_its_memory(tmp_path: Path) -> None:
    d = 512
    sd = gpt_like(layers=48, d=d)  # 48 layers x ~12.6 MiB: a ~600 MiB file, largest changed tensor 4 MiB
    path = tmp_path / "gpt.pt"
    torch.save(sd, path)
    size_mib = path.stat().st_size / 2**20
    largest_changed = 4 * d * d * 4 / 2**20
    migrations = chain(tmp_path, split_dim=d)
    out = tmp_path / "out.pt"

    peak, proc = peak_anon_mib(["upgrade", str(path), "--from", "base", "-o", str(out),
                                "--migrations", str(migrations)], tmp_path)

    assert proc.returncode == 0, proc.stderr
    budget = 300 + 2 * largest_changed  # the target of the streaming engine, torch's own footprint included
    print(f"\nupgrade of a {size_mib:.0f} MiB file: peak anonymous memory {peak:.0f} MiB (budget {budget:.0f} MiB)")
    assert peak < budget, f"peak private memory {peak:.0f} MiB for a {size_mib:.0f} MiB file"
    got = torch.load(out, mmap=True, weights_only=True)
    assert_bit_identical(got, split_and_reshaped(sd, d))


def test_splitting_a_fused_projection_is_free_and_walks_back(tmp_path: Path, cli: Cli) -> None:
    """Parts along the first dimension are runs of the fused tensor's bytes: views, as torch.split
    gives, so the chain stays metadata-only — in place, torch never imported — and merge joins them back."""
    d = 16
    sd = gpt_like(layers=6, d=d)
    path = tmp_path / "gpt.pt"
    torch.save(sd, path)
    before = path.stat()
    migrations = chain(tmp_path, split_dim=d)
    out = tmp_path / "parts.safetensors"  # safetensors has no views: each part gets its own bytes
    cli("upgrade", path, "--from", "base", "-o", out, "--migrations", migrations, check=True)
    assert_bit_identical(dict(sorted(load_file(out).items())), dict(sorted(split_and_reshaped(sd, d).items())))
    probe = textwrap.dedent("""
        import sys
        from ckptmigrate.cli import main
        try:
            main(sys.argv[1:], prog_name="ckptmigrate")
        finally:
            print("torch imported:", "torch" in sys.modules, file=sys.stderr)
    """)

    proc = subprocess.run([sys.executable, "-c", probe, "upgrade", str(path), "--from", "base", "--no-backup",
                           "--migrations", str(migrations)], capture_output=True, text=True, cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert "torch imported: False" in proc.stderr
    assert path.stat().st_ino == before.st_ino and path.stat().st_size - before.st_size < 64 * 1024
    assert_loads_as(path, split_and_reshaped(sd, d))

    cli("downgrade", path, "--to", "base", "--no-backup", "--migrations", migrations, check=True)

    assert path.stat().st_ino == before.st_ino
    assert_loads_as(path, sd)
