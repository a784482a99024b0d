"""Record a fixture for every revision of the example chain in migrations/ (once; commit the files).

The example module keeps the model of every era (ckptmigrate/example.py), so each revision's fixture
comes from the model as it really was then; a real project records each fixture when it writes the
revision (`ckptmigrate revision` does it when example_inputs is configured).
"""

from __future__ import annotations

from pathlib import Path

from ckptmigrate.chain import fixtures
from ckptmigrate.chain.scripts import ScriptDirectory
from ckptmigrate.example import ERAS, example_inputs, model_at

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    graph = ScriptDirectory(ROOT / "migrations").load()
    for era, rev in ERAS.items():
        checkpoint, io = fixtures.record(graph, rev, lambda era=era: model_at(era), example_inputs)
        print(f"{rev}: {checkpoint.relative_to(ROOT)} ({checkpoint.stat().st_size} bytes), "
              f"{io.relative_to(ROOT)} ({io.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
