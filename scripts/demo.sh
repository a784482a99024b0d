#!/usr/bin/env bash
# The main job end to end on the bundled example: save a checkpoint with the oldest model
# definition, inspect and stamp it, upgrade it with `ckptmigrate upgrade`, load it into today's model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=demo-out
rm -rf "$out" && mkdir -p "$out"
export PATH="$PWD/.venv/bin:$PATH"

echo "== 1. an old checkpoint, saved by era-1 code under nn.DataParallel"
python - "$out/old.pth" <<'PY'
import sys, torch
from ckptmigrate.example import model_at
torch.manual_seed(0)
torch.save(model_at(1).state_dict(), sys.argv[1])
PY
ckptmigrate inspect "$out/old.pth"
ckptmigrate current "$out/old.pth"

echo "== 2. stamp a copy (tensors untouched; torch.load still returns the same dict)"
ckptmigrate stamp "$out/old.pth" -o "$out/stamped.pth" --tag run=demo

echo "== 3. the migration chain"
ckptmigrate history --verbose

echo "== 4. plan, then upgrade in place (the original is kept as old.pth.bak)"
ckptmigrate upgrade "$out/old.pth" --dry-run
ckptmigrate upgrade "$out/old.pth"
ckptmigrate current "$out/old.pth"

echo "== 5. load into today's model and compare outputs with the era-1 model"
python - "$out/old.pth" "$out/old.pth.bak" <<'PY'
import sys, torch, ckptmigrate
from ckptmigrate.example import current_model, model_at
old = model_at(1)
old.load_state_dict(torch.load(sys.argv[2]))
new = current_model()
print(ckptmigrate.load_state_dict(new, sys.argv[1]))
x = torch.randn(8, 16)
assert torch.allclose(old(x), new(x), atol=1e-6), "outputs differ"
print("outputs of the era-1 and current models match")
PY

echo "== 6. walk back down to the first revision"
ckptmigrate downgrade "$out/old.pth" --to 0001 -o "$out/down.pth"
python - "$out/old.pth.bak" "$out/down.pth" <<'PY'
import sys, torch
a, b = torch.load(sys.argv[1]), torch.load(sys.argv[2])
assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
print("downgraded checkpoint holds the original tensors (same keys, same bytes)")
PY
echo "demo finished: files in $out/"
