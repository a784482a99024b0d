"""Record the worked Llama example's fixtures (run from tests/: ``python -m llama_example.record_fixtures``)."""

from __future__ import annotations

from pathlib import Path

from ckptmigrate.chain import fixtures
from ckptmigrate.chain.scripts import ScriptDirectory

from .models import example_inputs, hf_model, meta_model

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    graph = ScriptDirectory(HERE / "migrations").load()
    for rev, factory in (("0001", hf_model), ("0002", meta_model)):
        checkpoint, io = fixtures.record(graph, rev, factory, example_inputs)
        print(f"{rev}: {checkpoint.name} {checkpoint.stat().st_size} bytes, {io.name} {io.stat().st_size} bytes")
