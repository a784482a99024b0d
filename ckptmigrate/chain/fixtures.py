"""Migrations proven by outputs: a fixture recorded per revision, and the check that the chain
keeps the model's function.

A schema check cannot see a migration that produces the right shapes with the wrong values (a square
weight transposed, q and k swapped, RoPE rows permuted the wrong way). So each revision can keep,
beside its script, a seeded checkpoint of a small model as it was at that revision
(``NNNN_name.fixture.pt``, stamped with the revision) and the outputs it gave for example inputs
(``NNNN_name.fixture-io.pt``). :func:`check` upgrades every fixture to head, loads it into today's
model, runs the inputs and compares; where the chain is invertible, head's fixture is also walked
down to each revision and back up. A failure names the revision whose migration broke the function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptmigrate.chain.engine import apply, new_envelope
from ckptmigrate.chain.planning import plan_for
from ckptmigrate.chain.revisions import Revision, RevisionGraph
from ckptmigrate.checkpoint import model_config
from ckptmigrate.checkpoint.envelope import Envelope, now_utc, schema_of
from ckptmigrate.checkpoint.lazy import Checkpoint
from ckptmigrate.errors import BadInput, CkptMigrateError
from ckptmigrate.storage.atomic import atomic_write

FIXTURE_SUFFIX = ".fixture.pt"
IO_SUFFIX = ".fixture-io.pt"
#: (atol, rtol) per output dtype: migrations reorder arithmetic (a transpose, a split), never more.
TOLERANCES = {"float64": (1e-10, 1e-8), "float32": (1e-5, 1e-4), "float16": (1e-3, 1e-3), "bfloat16": (1e-2, 1e-2)}
SEED = 0

Factory = Callable[[], Any]


def paths(rev: Revision) -> tuple[Path, Path]:
    """Where a revision's fixture checkpoint and its inputs/outputs live: beside its script."""
    stem = rev.path.with_suffix("")
    return stem.with_name(stem.name + FIXTURE_SUFFIX), stem.with_name(stem.name + IO_SUFFIX)


def _flatten(outputs: Any, prefix: str = "output") -> dict[str, Any]:
    import torch

    if isinstance(outputs, torch.Tensor):
        return {prefix: outputs.detach()}
    if isinstance(outputs, Mapping):
        return {k: v for name, value in outputs.items() for k, v in _flatten(value, f"{prefix}.{name}").items()}
    if isinstance(outputs, (list, tuple)):
        return {k: v for i, value in enumerate(outputs) for k, v in _flatten(value, f"{prefix}.{i}").items()}
    return {}


def _run(model: Any, inputs: Any) -> dict[str, Any]:
    import torch

    model.eval()
    with torch.no_grad():
        if isinstance(inputs, Mapping):
            return _flatten(model(**inputs))
        return _flatten(model(*inputs) if isinstance(inputs, (list, tuple)) else model(inputs))


def _seeded(factory: Factory, seed: int) -> Any:
    import torch

    torch.manual_seed(seed)
    return factory()


def record(
    graph: RevisionGraph, rev_id: str, model: Factory, inputs: Factory, *, seed: int = SEED,
) -> tuple[Path, Path]:
    """Save ``rev_id``'s fixture from ``model()`` (the model as it is at that revision) and ``inputs()``.

    The model's schema must be the revision's snapshot when it has one: a fixture of another
    revision's model would prove nothing.
    """
    import torch

    rev = graph.get(rev_id)
    net = _seeded(model, seed)
    state_dict = net.state_dict()
    snapshot = rev.schema()
    if snapshot is not None and schema_of(state_dict) != snapshot:
        raise BadInput(f"revision {rev.id}: the fixture model's state dict is not this revision's schema "
                       f"({rev.schema_path.name}); record a fixture with the model as it is at {rev.id}")
    example = _seeded(inputs, seed + 1)
    with _one_thread():  # as check() runs it, so an unchanged model gives the same bits
        outputs = _run(net, example)
    if not outputs:
        raise BadInput(f"revision {rev.id}: the model returned no tensors for the example inputs")
    env = Envelope.build(state_dict, layout="bare", describe_code=False)
    env.lineage, env.revision = rev.lineage, rev.id
    env.history.append({"action": "fixture", "at": now_utc(), "revision": rev.id, "seed": seed})
    fixture, io = paths(rev)
    from ckptmigrate.formats import torchzip

    with atomic_write(fixture) as fh:
        torch.save(state_dict, fh)
        fh.flush()
        torchzip.append_records(fh, {torchzip.ENVELOPE_RECORD: torchzip.envelope_bytes(env.to_dict())})
    tolerances = {name: list(TOLERANCES.get(str(t.dtype).removeprefix("torch."), (0.0, 0.0)))
                  for name, t in outputs.items()}
    with atomic_write(io) as fh:
        torch.save({"revision": rev.id, "seed": seed, "inputs": example, "outputs": outputs,
                    "tolerances": tolerances}, fh)
    return fixture, io


@dataclass
class FixtureResult:
    """One fixture's verdict. ``kind`` is ``upgrade`` (fixture → head, outputs compared) or
    ``roundtrip`` (fixture → head → back, tensors compared); ``deviations`` is the largest absolute
    difference per output; ``blame`` the revisions whose migration broke it."""

    revision: str
    kind: str
    steps: list[str]
    ok: bool
    deviations: dict[str, float] = field(default_factory=dict)
    problem: str | None = None
    blame: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"revision": self.revision, "kind": self.kind, "steps": self.steps, "ok": self.ok,
                "deviations": self.deviations, "problem": self.problem, "blame": self.blame}


def _compare(outputs: Mapping[str, Any], io: Mapping[str, Any]) -> tuple[dict[str, float], str | None]:
    import torch

    deviations: dict[str, float] = {}
    problems = []
    for name, want in io["outputs"].items():
        got = outputs.get(name)
        if got is None or got.shape != want.shape:
            problems.append(f"{name}: shape {None if got is None else list(got.shape)}, recorded {list(want.shape)}")
            continue
        diff = (got.double() - want.double()).abs()
        deviations[name] = float(diff.max()) if diff.numel() else 0.0
        atol, rtol = io["tolerances"].get(name, (0.0, 0.0))
        if not torch.allclose(got.double(), want.double(), atol=atol, rtol=rtol, equal_nan=True):
            problems.append(f"{name}: differs by up to {deviations[name]:.3g} (tolerance atol {atol:g}, rtol {rtol:g})")
    return deviations, "; ".join(problems) or None


def _evaluate(ckpt: Checkpoint, model: Factory, io: Mapping[str, Any]) -> tuple[dict[str, float], str | None]:
    net = _seeded(model, SEED)
    try:
        net.load_state_dict(ckpt.materialize(), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        return {}, f"does not load into today's model: {first[1].strip() if len(first) > 1 else first[0]}"
    return _compare(_run(net, io["inputs"]), io)


def _load_io(path: Path) -> dict[str, Any]:
    import torch

    try:
        data = torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise BadInput(f"{path}: not a fixture's inputs and outputs ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict) or not {"inputs", "outputs", "tolerances"} <= data.keys():
        raise BadInput(f"{path}: not a fixture's inputs and outputs (missing inputs, outputs or tolerances)")
    return data


def recorded(graph: RevisionGraph, lineage: str | None = None) -> list[Revision]:
    """The revisions of ``lineage``'s chain that have a fixture, oldest first."""
    return [rev for rev in graph.chain(lineage) if all(p.is_file() for p in paths(rev))]


def unrecorded(graph: RevisionGraph, lineage: str | None = None) -> list[Revision]:
    """The revisions of ``lineage``'s chain without a fixture: a fault in one of them is blamed on a
    range of revisions, not on it alone."""
    have = {rev.id for rev in recorded(graph, lineage)}
    return [rev for rev in graph.chain(lineage) if rev.id not in have]


def check(graph: RevisionGraph, model: Factory, *, lineage: str | None = None) -> list[FixtureResult]:
    """Upgrade every recorded fixture to head and compare outputs; walk each back down and compare tensors."""
    chain = graph.chain(lineage)
    if not chain:
        raise BadInput("the script directory has no revisions")
    head = chain[-1]
    fixtures = recorded(graph, lineage)
    if not fixtures:
        raise BadInput("no recorded fixtures: set [tool.ckptmigrate] example_inputs (and fixture_model) and run "
                       "`ckptmigrate fixture record`")
    config = _Config(model)
    with _one_thread():
        results = [_upgrade_result(graph, rev, model, config, lineage) for rev in fixtures]
        _blame(results, [r.id for r in chain])
        results += [_roundtrip_result(graph, rev, config, lineage) for rev in fixtures if rev is not head]
    return results


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run the fixture models on one intra-op thread: they are small by design, and on a shared CI
    runner torch's thread pool made each tiny forward pass ~100x slower (scripts/bench_test.py)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Config:
    """The fixture model's configuration (``ckpt.config``), read from one model built on first use."""

    def __init__(self, model: Factory) -> None:
        self.model = model
        self.value: dict[str, Any] | None = None

    def get(self) -> dict[str, Any]:
        if self.value is None:
            self.value = model_config.of_model(_seeded(self.model, SEED))
        return self.value


def _open(fixture: Path, config: _Config) -> Checkpoint:
    """The fixture, with the fixture model's configuration as ``ckpt.config`` (a fixture file has none)."""
    ckpt = Checkpoint.open(fixture)
    if not ckpt.config:
        ckpt.config = dict(config.get())  # a migration may edit its copy
    return ckpt


def _upgrade_result(graph: RevisionGraph, rev: Revision, model: Factory, config: _Config,
                    lineage: str | None) -> FixtureResult:
    fixture, io_path = paths(rev)
    io = _load_io(io_path)
    with _open(fixture, config) as ckpt:
        try:
            plan = plan_for(ckpt, graph, to="head", lineage=lineage)
            apply(ckpt, plan)
        except CkptMigrateError as exc:
            return FixtureResult(rev.id, "upgrade", [], False, problem=str(exc))
        steps = [s.id for s in plan.steps]
        deviations, problem = _evaluate(ckpt, model, io)
    return FixtureResult(rev.id, "upgrade", steps, problem is None, deviations, problem)


def _roundtrip_result(graph: RevisionGraph, rev: Revision, config: _Config, lineage: str | None) -> FixtureResult:
    """``rev``'s fixture up to head and back down, from the inverses recorded on the way up: the
    tensors must come back bit for bit."""
    import torch

    fixture, _io = paths(rev)
    with Checkpoint.open(fixture) as original, _open(fixture, config) as ckpt:
        want = original.materialize()
        try:
            up = plan_for(ckpt, graph, to="head", lineage=lineage)
            ckpt.envelope = new_envelope(ckpt, up, apply(ckpt, up), written=False)
            down = plan_for(ckpt, graph, to=rev.id, lineage=lineage)
            apply(ckpt, down)
        except CkptMigrateError as exc:
            if "no downgrade()" in str(exc) or "cannot be undone" in str(exc):
                return FixtureResult(rev.id, "roundtrip", [], True, problem=f"not invertible, skipped: {exc}")
            return FixtureResult(rev.id, "roundtrip", [], False, problem=str(exc))
        steps = [s.id for s in up.steps]
        got = ckpt.materialize()
    changed = [k for k in want if k not in got or got[k].dtype != want[k].dtype or got[k].shape != want[k].shape
               or not torch.equal(got[k].reshape(-1).view(torch.uint8), want[k].reshape(-1).view(torch.uint8))]
    changed += [k for k in got if k not in want]
    problem = f"the walk back changed {', '.join(changed[:5])}" if changed else None
    return FixtureResult(rev.id, "roundtrip", steps, problem is None, problem=problem,
                         blame=[s.id for s in up.steps] if problem else [])


def _blame(results: Sequence[FixtureResult], order: Sequence[str]) -> None:
    """A fixture that fails while the next recorded one passes puts the fault in the revisions
    between them: with a fixture per revision, exactly one."""
    ok_at = {r.revision: r.ok for r in results if r.kind == "upgrade"}
    for r in results:
        if r.ok or r.kind != "upgrade":
            continue
        later = [rev for rev in order[order.index(r.revision) + 1:] if rev in ok_at]
        passing = next((rev for rev in later if ok_at[rev]), None)
        end = order.index(passing) + 1 if passing is not None else len(order)
        r.blame = list(order[order.index(r.revision) + 1:end])
