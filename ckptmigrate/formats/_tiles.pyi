from collections.abc import Callable
from typing import Any

def scan(
    data: bytes, pos: int, max_key: int, memo: list[Any], stack: list[Any], mine: dict[str, Any],
    storages: dict[str, Any], gets: dict[bytes, tuple[str, int, str]], layouts: dict[bytes, Any],
    resolve_gets: Callable[[bytes, int], tuple[str, int, str] | None],
    resolve_layout: Callable[[bytes, bytes, bytes, Any, bool], Any], storage_type: Callable[..., Any],
    tensor_type: Callable[..., Any],
) -> int | None: ...
