from typing import Any

def entries(
    tensor_type: type, storage_type: type, memo: dict[int, tuple[int, Any]], plain: dict[str, bytes],
    middles: dict[tuple[Any, ...], bytes], itemsize: dict[str, int], by_storage: dict[int, Any], taken: set[str],
    records: list[Any], batch: list[Any], pos: int, idx: int, /,
) -> tuple[bytes, int]: ...
def schema_json(keys: list[str], schema: dict[str, Any], encode: Any, /) -> str | None: ...
