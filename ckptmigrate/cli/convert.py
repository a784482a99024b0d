"""``ckptmigrate convert``: one container to another (one file or a sharded / DCP directory)."""

from __future__ import annotations

from pathlib import Path

import click

from ckptmigrate.cli.common import LOCATION, naming
from ckptmigrate.errors import BadInput

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """``5GB``, ``500MiB``, ``1000000``: a size as huggingface_hub's ``max_shard_size`` takes it."""
    raw = text.strip().upper()
    digits = raw.rstrip("KMGTIB")
    unit = raw[len(digits):]
    try:
        value = float(digits)
    except ValueError:
        raise BadInput(f"--max-shard-size {text}: not a size (e.g. 5GB, 500MiB)") from None
    if unit not in _UNITS or value <= 0:
        raise BadInput(f"--max-shard-size {text}: not a size (e.g. 5GB, 500MiB)")
    return int(value * _UNITS[unit])


@click.command()
@click.argument("src", type=LOCATION)
@click.argument("dst", type=LOCATION)
@click.option("--to", "to", required=True, type=click.Choice(["torch", "safetensors", "hf-sharded", "dcp"]),
              help="The container to write.")
@click.option("--max-shard-size", default=None, help="hf-sharded: the largest shard (5GB by default).")
@click.option("--state-dict-only", is_flag=True, help="Write the state dict alone (leave the extras).")
def convert(src: Path, dst: Path, to: str, max_shard_size: str | None, state_dict_only: bool) -> None:
    """Write SRC as DST in another container, copying tensor bytes (memory ~ the largest tensor)."""
    from ckptmigrate import api

    with naming(src):
        written = api.convert(src, dst, to=to, state_dict_only=state_dict_only,
                              max_shard_size=parse_size(max_shard_size) if max_shard_size else None)
    click.echo(f"{src} -> {written} ({to})")
