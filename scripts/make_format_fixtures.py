"""Write tests/fixtures/format-v1/: checkpoints stamped, signed and migrated by this version.

Run once per format version and commit the output; never regenerate a released version's files.
Every later ckptmigrate must read, verify and downgrade them (tests/test_format_golden.py), which is
what keeps files already stamped in the world verifying. The signing key is thrown away: only the
public key is kept, beside the files.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ckptmigrate import api
from ckptmigrate.example import model_at

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "format-v1"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        private, public = Path(tmp) / "signer.pem", OUT / "signer.pub.pem"
        public.unlink(missing_ok=True)
        subprocess.run([sys.executable, "-m", "ckptmigrate", "keygen", str(private), str(public)], check=True)

        torch.manual_seed(0)
        era1 = OUT / "era1.pth"
        torch.save(model_at(1).state_dict(), era1)

        signed = OUT / "era1-signed.pth"
        api.stamp(era1, output=signed, sign=private, tags={"fixture": "format-v1"})

        migrated = OUT / "head-migrated.pth"
        shutil.copyfile(era1, migrated)
        subprocess.run([sys.executable, "-m", "ckptmigrate", "upgrade", str(migrated), "--no-backup",
                        "--migrations", str(ROOT / "migrations")], check=True, cwd=tmp)
        api.stamp(migrated, sign=private)

        tensors = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(3, dtype=torch.bfloat16)}
        st = OUT / "stamped.safetensors"
        save_file(tensors, str(st))
        api.stamp(st, digest=True, tags={"fixture": "format-v1"})
    for p in sorted(OUT.iterdir()):
        print(f"{p.relative_to(ROOT)}  {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
