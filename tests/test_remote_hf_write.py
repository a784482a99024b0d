"""User story: "Our checkpoints live on the Hugging Face Hub: I upgrade, downgrade and stamp them where
they are, or write an upgraded copy to another path or repository, and each write is one commit on
my branch, on top of the commit I read: the old file stays in the repository's history, a run that
lost a race commits nothing, a tag is not written to, and my token is never shown."

Against a Hub on 127.0.0.1 (tests/hubserver.py: reads, plus the preupload, LFS batch and commit
endpoints, a 412 for a stale ``parentCommit``), through huggingface_hub's ``HfApi.create_commit`` as
a subprocess CLI, Xet off (``HF_HUB_DISABLE_XET=1``: the client uploads through Xet whenever hf_xet
is installed, without asking the server, and this Hub has no Xet). The bytes are the ones the
server counted.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save

from ckptmigrate.storage.ranges import MIN_READ
from tests.hubserver import HubServer

Cli = Callable[..., subprocess.CompletedProcess[str]]
TOKEN = "hf_writeTokenNeverShown0987654321"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    server = HubServer(tmp_path_factory.mktemp("hub")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def env(hub: HubServer) -> dict[str, str]:
    hub.served.reset()
    hub.tokens.clear()
    hub.store.uploads.clear()
    return {**hub.env, "HF_TOKEN": TOKEN}


@pytest.fixture
def repo(hub: HubServer, tmp_path: Path) -> Callable[..., str]:
    """A new repository of the test's own, its files as its first commit on ``main``."""
    made = iter(range(100))

    def make(files: dict[str, bytes]) -> str:
        repo_id = f"alice/{tmp_path.name[-30:].replace('_', '-')}-{next(made)}"
        for name, data in files.items():
            (hub.root / repo_id / name).parent.mkdir(parents=True, exist_ok=True)
            (hub.root / repo_id / name).write_bytes(data)
        return repo_id

    return make


def checkpoint(numel: int = 64 * 1024, seed: int = 0) -> bytes:
    torch.manual_seed(seed)
    buf = io.BytesIO()
    torch.save({"body.weight": torch.randn(numel), "head.bias": torch.arange(4.0)}, buf)
    return buf.getvalue()


def loads(data: bytes) -> dict[str, torch.Tensor]:
    return dict(torch.load(io.BytesIO(data), weights_only=True))


def chain(tmp_path: Path, race: str | None = None) -> Path:
    """c1 (base) -> c2: a rename; ``race``: a line the c2 script runs first (another writer)."""
    versions = tmp_path / "chain" / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    (versions / "c1.py").write_text('"""c1."""\nrevision = "c1"\ndown_revision = None\n\n\ndef upgrade(ckpt):\n'
                                    "    pass\n\n\ndef downgrade(ckpt):\n    pass\n")
    body = f"    {race}\n" if race else ""
    (versions / "c2.py").write_text(
        '"""c2."""\nimport os\n\nrevision = "c2"\ndown_revision = "c1"\n\n\ndef upgrade(ckpt):\n'
        f"{body}    ckpt.rename('head.bias', 'out.bias')\n\n\ndef downgrade(ckpt):\n"
        "    ckpt.rename('out.bias', 'head.bias')\n")
    return versions.parent


def writes(hub: HubServer) -> list[str]:
    """The requests that were not reads."""
    return [line for line in hub.served.log if not line.startswith(("GET", "HEAD", "POST /api/models/alice"))
            or re.match(r"POST /api/models/[^ ]+/(preupload|commit)/", line)]


def test_upgrade_in_place_is_one_commit_on_top_of_the_commit_read(cli: Cli, hub: HubServer, env: dict[str, str],
                                                                   repo: Callable[..., str], tmp_path: Path) -> None:
    original = checkpoint()
    repo_id = repo({"m.pt": original, "config.json": b"{}"})
    read_at = hub.commit(repo_id)
    url = f"hf://{repo_id}/m.pt"
    plan = cli("upgrade", url, "--from", "c1", "--migrations", chain(tmp_path), "--dry-run", "--json", env=env)
    assert plan.returncode == 0 and hub.commit(repo_id) == read_at, plan.stderr
    planning = json.loads(plan.stdout)["transfer"]["bytes_received"]
    assert not writes(hub) and planning < len(original) // 2  # a plan reads the directory and data.pkl
    proc = cli("upgrade", url, "--from", "c1", "--migrations", chain(tmp_path), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    head = hub.commit(repo_id)
    commit = hub.history(repo_id).commits[head]
    assert head != read_at and commit.parent == read_at  # one commit, on top of the commit read
    assert "ckptmigrate" in commit.title and "upgrade c1 -> c2" in commit.title, commit.title
    assert read_at in commit.description
    new = hub.file(repo_id, "m.pt")
    assert sorted(loads(new)) == ["body.weight", "out.bias"]
    assert torch.equal(loads(new)["body.weight"], loads(original)["body.weight"])
    assert set(commit.files) == {"m.pt", "config.json"} and commit.files["config.json"] == b"{}"

    # the backup is the Hub's history: the commit read, still readable as it was
    assert result["backup"] == f"hf://{repo_id}@{read_at}/m.pt"
    assert hub.file(repo_id, "m.pt", read_at) == original
    old = cli("current", result["backup"], env=env)
    assert old.returncode == 0 and old.stdout.strip() == "unstamped", old.stdout + old.stderr
    assert cli("current", url, env=env).stdout.strip() == "c2"

    # LFS has no splice: the whole new file went up, once; the kept bytes came down to be staged
    transfer = result["transfer"]
    assert hub.store.uploads == [len(new)] and transfer["bytes_sent"] == len(new)
    assert len(original) // 2 < transfer["bytes_received"] - planning <= len(original) + MIN_READ  # + a header read
    assert set(hub.tokens) == {TOKEN} and TOKEN not in proc.stdout + proc.stderr
    assert TOKEN.encode() not in new and TOKEN not in commit.title + commit.description

    # and back down: another commit, on top of the last
    down = cli("downgrade", url, "--to", "c1", "--migrations", chain(tmp_path), env=env)
    assert down.returncode == 0, down.stderr
    assert hub.history(repo_id).commits[hub.commit(repo_id)].parent == head
    assert sorted(loads(hub.file(repo_id, "m.pt"))) == ["body.weight", "head.bias"]


def test_a_safetensors_rename_and_a_stamp_are_commits_too(cli: Cli, hub: HubServer, env: dict[str, str],
                                                          repo: Callable[..., str], tmp_path: Path) -> None:
    tensors = {"body.weight": torch.randn(100_000), "head.bias": torch.arange(4.0)}
    original = save(tensors)
    repo_id = repo({"model.safetensors": original})
    url = f"hf://{repo_id}/model.safetensors"
    read_at = hub.commit(repo_id)
    proc = cli("upgrade", url, "--from", "c1", "--migrations", chain(tmp_path), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    new = hub.file(repo_id, "model.safetensors")
    assert sorted(load(new)) == ["body.weight", "out.bias"] and torch.equal(load(new)["out.bias"], tensors["head.bias"])
    old_head, new_head = (8 + int.from_bytes(b[:8], "little") for b in (original, new))
    assert new[new_head:] == original[old_head:]  # the same data behind a new header
    assert hub.history(repo_id).commits[hub.commit(repo_id)].parent == read_at
    assert json.loads(proc.stdout)["transfer"]["bytes_sent"] == len(new) and hub.store.uploads == [len(new)]

    renamed = hub.commit(repo_id)
    stamp = cli("stamp", url, "--tag", "run=7", env=env)
    assert stamp.returncode == 0, stamp.stderr
    commit = hub.history(repo_id).commits[hub.commit(repo_id)]
    assert commit.parent == renamed and "stamp c2 -> c2" in commit.title, commit.title
    info = cli("inspect", url, "--json", env=env)
    assert json.loads(info.stdout)["envelope"]["tags"] == {"run": "7"}, info.stdout + info.stderr
    assert load(hub.file(repo_id, "model.safetensors")).keys() == load(new).keys()


def test_dash_o_writes_another_path_or_repository(cli: Cli, hub: HubServer, env: dict[str, str],
                                                  repo: Callable[..., str], tmp_path: Path) -> None:
    original = checkpoint()
    src_repo, dst_repo = repo({"m.pt": original}), repo({"README.md": b"# releases\n"})
    src = f"hf://{src_repo}/m.pt"
    before = hub.commit(src_repo)
    for dst, where in ((f"hf://{src_repo}/upgraded/m.pt", src_repo), (f"hf://{dst_repo}/m.pt", dst_repo)):
        head = hub.commit(where)
        done = cli("upgrade", src, "--from", "c1", "--migrations", chain(tmp_path), "-o", dst, env=env)
        assert done.returncode == 0, done.stderr
        commit = hub.history(where).commits[hub.commit(where)]
        assert commit.parent == head and "ckptmigrate: upgrade c1 -> c2" in commit.title, commit.title
        assert sorted(loads(commit.files[dst.split("/", 4)[-1]])) == ["body.weight", "out.bias"]
        assert cli("current", dst, env=env).stdout.strip() == "c2"
    assert hub.file(src_repo, "m.pt") == original  # the source is untouched
    assert hub.file(dst_repo, "README.md") == b"# releases\n"
    again = cli("upgrade", src, "--from", "c1", "--migrations", chain(tmp_path), "-o", f"hf://{dst_repo}/m.pt",
                env=env)
    assert again.returncode == 2 and f"hf://{dst_repo}/m.pt: the output exists" in again.stderr, again.stderr
    assert len(hub.history(src_repo).commits) == 2 and hub.commit(src_repo) != before  # the -o into src_repo
    assert TOKEN not in done.stdout + done.stderr + again.stderr
    stamped = cli("stamp", src, "--tag", "run=8", "-o", f"hf://{dst_repo}/stamped.pt", env=env)
    assert stamped.returncode == 0, stamped.stderr
    commit = hub.history(dst_repo).commits[hub.commit(dst_repo)]
    assert commit.title == "ckptmigrate: stamp unstamped -> base (stamped.pt)", commit.title
    assert loads(commit.files["stamped.pt"]).keys() == loads(original).keys()


def test_the_loser_of_two_writers_commits_nothing(cli: Cli, hub: HubServer, env: dict[str, str],
                                                  repo: Callable[..., str], tmp_path: Path) -> None:
    repo_id = repo({"m.pt": checkpoint()})
    url = f"hf://{repo_id}/m.pt"
    theirs = checkpoint(seed=1)
    (tmp_path / "theirs.pt").write_bytes(theirs)
    race = ("from huggingface_hub import HfApi, utils; utils.disable_progress_bars(); "
            f"HfApi().upload_file(path_or_fileobj={str(tmp_path / 'theirs.pt')!r}, path_in_repo='m.pt', "
            f"repo_id={repo_id!r})")
    proc = cli("upgrade", url, "--from", "c1", "--migrations", chain(tmp_path, race), "--json", env=env)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{url}: another commit changed m.pt on main since commit" in proc.stderr
    error = json.loads(proc.stdout)["error"]
    assert (error["type"], error["found"]) == ("ObjectChanged", hub.commit(repo_id))
    assert hub.file(repo_id, "m.pt") == theirs  # their commit stands, and ours was never made:
    assert len(hub.store.uploads) == 2  # ours was uploaded, and the Hub refused its commit (412: a stale parent)
    assert len(hub.history(repo_id).commits) == 2 and TOKEN not in proc.stdout + proc.stderr

    # a commit to another file meanwhile is no conflict: ours goes on top of it
    race = "from huggingface_hub import HfApi; HfApi().upload_file(path_or_fileobj=b'x', path_in_repo='notes.txt', " \
        f"repo_id={repo_id!r})"
    before = hub.commit(repo_id)
    ok = cli("upgrade", url, "--from", "c1", "--migrations", chain(tmp_path / "again", race), env=env)
    assert ok.returncode == 0, ok.stderr
    ours = hub.history(repo_id).commits[hub.commit(repo_id)]
    theirs_commit = hub.history(repo_id).commits[ours.parent or ""]
    assert theirs_commit.parent == before and theirs_commit.files["notes.txt"] == b"x"
    assert sorted(loads(ours.files["m.pt"])) == ["body.weight", "out.bias"] and ours.files["notes.txt"] == b"x"


def test_a_revision_that_is_not_a_branch_or_a_hub_without_xet_is_one_line(cli: Cli, hub: HubServer, env: dict[str, str],
                                                    repo: Callable[..., str], tmp_path: Path) -> None:
    repo_id = repo({"m.pt": checkpoint()})
    hub.tag(repo_id, "v1")
    sha = hub.commit(repo_id)
    for revision, what in (("v1", "is a tag"), (sha, "is not a branch")):
        url = f"hf://{repo_id}@{revision}/m.pt"
        for args in (("upgrade", url, "--from", "c1", "--migrations", chain(tmp_path)), ("stamp", url),
                     ("upgrade", f"hf://{repo_id}/m.pt", "--from", "c1", "--migrations", chain(tmp_path), "-o", url)):
            hub.served.reset()
            proc = cli(*args, env=env)
            assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (args, proc.stderr)
            assert f"{url}: revision {revision} {what}, and a Hub commit needs a branch" in proc.stderr, proc.stderr
            assert not writes(hub), hub.served.log
    # a Hub without Xet, and huggingface_hub left to upload through it: one line naming the switch
    xet = cli("stamp", f"hf://{repo_id}/m.pt", env=env | {"HF_HUB_DISABLE_XET": "0"})
    assert xet.returncode == 2 and xet.stderr.count("\n") == 1, xet.stderr
    assert "this Hub has no Xet storage" in xet.stderr and "set HF_HUB_DISABLE_XET=1" in xet.stderr
    assert len(hub.history(repo_id).commits) == 1


def test_a_sharded_model_is_renamed_in_one_commit(cli: Cli, hub: HubServer, env: dict[str, str],
                                                  repo: Callable[..., str], tmp_path: Path) -> None:
    shards = {"model-00001-of-00002.safetensors": {"head.bias": torch.arange(4.0), "a.weight": torch.ones(1000)},
              "model-00002-of-00002.safetensors": {"body.weight": torch.randn(50_000)}}
    index = {"metadata": {"total_size": 0}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    files = {f"weights/{name}": save(part) for name, part in shards.items()}
    repo_id = repo(files | {"weights/model.safetensors.index.json": json.dumps(index).encode()})
    read_at = hub.commit(repo_id)
    prefix = f"hf://{repo_id}/weights/"
    # dropping a tensor would rewrite a shard's data: refused in one line, nothing sent
    dropped = cli("upgrade", prefix, "--from", "c1", "--migrations", chain(tmp_path / "drop", "ckpt.drop('a.weight')"),
                  env=env)
    assert dropped.returncode == 2 and dropped.stderr.count("\n") == 1, dropped.stderr
    assert "is not done on the Hub yet" in dropped.stderr and not writes(hub), hub.served.log
    proc = cli("upgrade", prefix, "--from", "c1", "--migrations", chain(tmp_path), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    commit = hub.history(repo_id).commits[hub.commit(repo_id)]
    assert commit.parent == read_at  # one commit: the index and the shard renamed in, atomically
    changed = {f for f in commit.files if commit.files[f] != hub.file(repo_id, f, read_at)}
    assert changed == {"weights/model.safetensors.index.json", "weights/model-00001-of-00002.safetensors"}
    assert sorted(load(commit.files["weights/model-00001-of-00002.safetensors"])) == ["a.weight", "out.bias"]
    assert json.loads(commit.files["weights/model.safetensors.index.json"])["weight_map"]["out.bias"] == \
        "model-00001-of-00002.safetensors"
    result = json.loads(proc.stdout)
    assert result["backup"] == f"hf://{repo_id}@{read_at}/weights/model.safetensors.index.json"
    first = load(commit.files["weights/model-00001-of-00002.safetensors"])
    assert torch.equal(first["out.bias"], torch.arange(4.0)) and torch.equal(first["a.weight"], torch.ones(1000))
    info = cli("inspect", prefix, "--json", env=env)
    assert info.returncode == 0 and json.loads(info.stdout)[0]["tensors"] == 3, info.stderr
    assert cli("current", prefix, env=env).stdout.strip().endswith("c2")


def test_a_fleet_on_one_repository_makes_one_commit_per_file(cli: Cli, hub: HubServer, env: dict[str, str],
                                                             repo: Callable[..., str], tmp_path: Path) -> None:
    names = [f"run{i}.pt" for i in range(3)]
    repo_id = repo({name: checkpoint(4096, seed=i) for i, name in enumerate(names)})
    first = hub.commit(repo_id)
    proc = cli("upgrade", f"hf://{repo_id}/*.pt", "--from", "c1", "--migrations", chain(tmp_path), "-j", "2", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    history = hub.history(repo_id)
    line, sha = [], hub.commit(repo_id)
    while sha != first:  # one line of commits from the first: none lost, whichever runner raced which
        line.append(history.commits[sha])
        sha = history.commits[sha].parent or ""
    assert len(line) == 3 == len(history.commits) - 1
    assert sorted(c.title for c in line) == [f"ckptmigrate: upgrade c1 -> c2 ({name})" for name in names]
    for i, name in enumerate(names):
        got = loads(hub.file(repo_id, name))
        assert sorted(got) == ["body.weight", "out.bias"]
        assert torch.equal(got["body.weight"], loads(checkpoint(4096, seed=i))["body.weight"])


def test_a_dcp_checkpoint_is_renamed_in_one_commit_of_its_metadata(cli: Cli, hub: HubServer, env: dict[str, str],
                                                                    repo: Callable[..., str], tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    state = {"body.weight": torch.randn(10_000), "head.bias": torch.arange(4.0)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group, assuming a single process"
        dcp.save(state, checkpoint_id=str(tmp_path / "dcp"))
    repo_id = repo({f"ckpt/{p.name}": p.read_bytes() for p in (tmp_path / "dcp").iterdir()})
    read_at = hub.commit(repo_id)
    prefix = f"hf://{repo_id}/ckpt/"
    proc = cli("upgrade", prefix, "--from", "c1", "--migrations", chain(tmp_path), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    commit = hub.history(repo_id).commits[hub.commit(repo_id)]
    old = hub.history(repo_id).commits[read_at].files
    assert commit.parent == read_at and "ckptmigrate: upgrade c1 -> c2" in commit.title, commit.title
    changed = {f for f in commit.files.keys() | old.keys() if commit.files.get(f) != old.get(f)}
    assert "ckpt/.metadata" in changed and not [f for f in changed if f.endswith(".distcp")]  # no data moved
    [envelope] = [f for f in commit.files if f.startswith("ckpt/.ckptmigrate-")]
    assert changed == {"ckpt/.metadata", envelope}
    assert json.loads(proc.stdout)["backup"] == f"hf://{repo_id}@{read_at}/ckpt/.metadata"
    for name, data in commit.files.items():  # the new commit, as a user downloads it, loads renamed
        (tmp_path / "got" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "got" / name).write_bytes(data)
    got = {"body.weight": torch.zeros(10_000), "out.bias": torch.zeros(4)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(got, checkpoint_id=str(tmp_path / "got" / "ckpt"))
    assert torch.equal(got["out.bias"], state["head.bias"]) and torch.equal(got["body.weight"], state["body.weight"])

    stamped = cli("stamp", prefix, "--tag", "run=9", env=env)  # the same .metadata: its envelope replaced
    assert stamped.returncode == 0, stamped.stderr
    files = hub.history(repo_id).commits[hub.commit(repo_id)].files
    assert [f for f in files if f.startswith("ckpt/.ckptmigrate-")] == [envelope] and files[envelope] != \
        commit.files[envelope]
    assert cli("current", prefix, env=env).stdout.strip().endswith("c2")
    down = cli("downgrade", prefix, "--to", "c1", "--migrations", chain(tmp_path), env=env)  # a new .metadata:
    assert down.returncode == 0, down.stderr  # the envelope named for it added, the old one deleted, in one commit
    files = hub.history(repo_id).commits[hub.commit(repo_id)].files
    [now] = [f for f in files if f.startswith("ckpt/.ckptmigrate-")]
    assert now != envelope and files["ckpt/.metadata"] != commit.files["ckpt/.metadata"]
