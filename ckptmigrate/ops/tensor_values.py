"""What the ops compute on tensor values, and the byte views that spare computing them.

The value functions run when a :class:`~ckptmigrate.tensors.refs.Deferred` is materialised (at
write time, one tensor at a time); a view (:func:`slice_view`, :func:`joined_view`) is a part or a
join of stored bytes as a :class:`~ckptmigrate.tensors.refs.TensorRef`, so a split or merge along a
tensor's outer dimension moves no bytes and the file can still be rewritten in place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ckptmigrate.tensors.refs import ITEMSIZE, Entry, TensorRef, contiguous_stride, dtype_name, to_torch, torch_dtype

if TYPE_CHECKING:
    import torch

#: Mantissa bits of the IEEE float types whose NaNs :func:`cast_exact` carries across.
MANTISSA_BITS = {"float16": 10, "bfloat16": 7, "float32": 23, "float64": 52}


def keeps_values(old: str, new: str) -> bool:
    """Every ``old`` value is exactly a ``new`` value, so casting back restores the same bits."""
    import torch

    a, b = torch_dtype(old), torch_dtype(new)
    if a == b or a == torch.bool:
        return True
    a_float, b_float = a.is_floating_point or a.is_complex, b.is_floating_point or b.is_complex
    if b == torch.bool or (a_float and not b_float) or (a.is_complex and not b.is_complex):
        return False
    try:
        if a_float:
            fa, fb = torch.finfo(a), torch.finfo(b)
            return fb.eps <= fa.eps and fb.max >= fa.max and fb.smallest_normal <= fa.smallest_normal
        ia = torch.iinfo(a)
        if b_float:
            fb = torch.finfo(b)
            return max(-ia.min, ia.max) <= min(2 / fb.eps, fb.max)
        ib = torch.iinfo(b)
        return ib.min <= ia.min and ib.max >= ia.max
    except TypeError:  # quantized and other dtypes without finfo/iinfo
        return False


def cast_exact(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t.to(dtype)``, but NaNs keep their sign and payload between IEEE float types (torch's half casts
    make them one NaN), so a tensor cast up and back is bit for bit what it was."""
    import torch

    out = t.to(torch_dtype(name))
    src = dtype_name(t.dtype)
    if src == name or src not in MANTISSA_BITS or name not in MANTISSA_BITS:
        return out
    nan = t.isnan()
    if not nan.any():
        return out
    (src_bits, src_mant), (dst_bits, dst_mant) = [(ITEMSIZE[d] * 8, MANTISSA_BITS[d]) for d in (src, name)]
    ints = {16: torch.int16, 32: torch.int32, 64: torch.int64}
    bits = t.view(ints[src_bits])[nan].to(torch.int64)
    payload = bits & ((1 << src_mant) - 1)
    payload = payload << (dst_mant - src_mant) if dst_mant >= src_mant else payload >> (src_mant - dst_mant)
    payload = torch.where(payload == 0, 1 << (dst_mant - 1), payload)  # still a NaN, a quiet one
    sign = ((bits >> (src_bits - 1)) & 1) << (dst_bits - 1)
    exponent = ((1 << (dst_bits - 1 - dst_mant)) - 1) << dst_mant
    out.view(ints[dst_bits])[nan] = (sign | exponent | payload).to(ints[dst_bits])
    return out


def reshape(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return t.reshape(shape)


def reshape_all(ts: list[torch.Tensor], shape: tuple[int, ...]) -> list[torch.Tensor]:
    return [ts[0].reshape(shape)]


def truncate(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return t[tuple(slice(0, d) for d in shape)]


def runs_along(ref: TensorRef, dim: int) -> bool:
    """A stored contiguous tensor whose slices along ``dim`` are single runs of bytes."""
    return ref.stride == contiguous_stride(ref.shape) and math.prod(ref.shape[:dim]) == 1


def slice_view(src: Entry, dim: int, start: int, size: int) -> TensorRef | None:
    """A part of a stored tensor as a view of the same bytes, as ``torch.split`` gives: no copy, no
    torch, and the file can still be rewritten in place. None when the part is not one run."""
    if not isinstance(src, TensorRef) or not runs_along(src, dim) or src.numel == 0:
        return None
    shape = (*src.shape[:dim], size, *src.shape[dim + 1:])
    offset = src.storage_offset + start * math.prod(src.shape[dim + 1:])
    return src.view(offset, shape, contiguous_stride(shape))


def joined_view(parts: Sequence[Entry], dim: int) -> TensorRef | None:
    """Adjacent views of one storage (the parts a split left) joined back into one view."""
    first = parts[0]
    if not isinstance(first, TensorRef):
        return None
    offset = first.storage_offset
    for part in parts:
        if (not isinstance(part, TensorRef) or part.storage is not first.storage or part.dtype != first.dtype
                or part.metadata != first.metadata or not runs_along(part, dim)
                or part.storage_offset != offset or part.numel == 0):
            return None
        offset += part.numel
    shape = list(first.shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    return first.view(first.storage_offset, tuple(shape), contiguous_stride(tuple(shape)))


def narrow(src: Entry, dim: int, start: int, size: int) -> torch.Tensor:
    return to_torch(src).narrow(dim, start, size).contiguous()


def split_all(ts: list[torch.Tensor], sizes: list[int], dim: int) -> list[torch.Tensor]:
    return list(ts[0].split(sizes, dim=dim))


def pad(t: torch.Tensor, shape: tuple[int, ...], value: float) -> torch.Tensor:
    import torch

    out = torch.full(shape, value, dtype=t.dtype)
    out[tuple(slice(0, d) for d in t.shape)] = t
    return out


def cat(entries: Sequence[Entry], dim: int) -> torch.Tensor:
    return cat_tensors([to_torch(e) for e in entries], dim)


def cat_tensors(tensors: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    import torch

    return torch.cat(list(tensors), dim=dim)
