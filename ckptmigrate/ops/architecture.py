"""Ops for today's architectures: per-expert weights stacked into one tensor and back, RoPE rows
permuted between the Hugging Face and Meta layouts, grouped-query attention splits, interpolated
position embeddings, resized vocabularies, tied embeddings.

Each op leaves :class:`~ckptmigrate.tensors.refs.Deferred` tensors (streamed one at a time when the
file is written), records its exact inverse where one exists, and carries the optimizer state:
moments follow the same function, and elements that did not exist before start at zero. Sizes an op
can read from the model's configuration (``ckpt.config``: head counts, kv-head counts) default to it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

from ckptmigrate.ops.operations import INVERSE_OPS, Operations, OpError
from ckptmigrate.tensors.refs import Deferred, TensorRef, dtype_of, shape_of, to_torch

if TYPE_CHECKING:
    import torch

#: Config keys that name the same quantity across model families (HF, Meta/llama, torchtune).
CONFIG_NAMES = {
    "n_heads": ("num_attention_heads", "n_heads", "num_heads", "n_head"),
    "n_kv_heads": ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "n_head_kv"),
    "head_dim": ("head_dim",),
}


class ArchitectureOps(Operations):
    """The op vocabulary with the architecture ops; :class:`~ckptmigrate.checkpoint.lazy.Checkpoint`
    is one."""

    inverse_ops: ClassVar[frozenset[str]] = INVERSE_OPS | {"stack", "unstack", "permute_rope", "resize", "tie", "untie"}

    def _config_value(self, op: str, name: str, given: int | None) -> int:
        if given is not None:
            return int(given)
        config = getattr(self, "config", None) or {}
        for alias in CONFIG_NAMES[name]:
            if isinstance(config.get(alias), int):
                return int(config[alias])
        raise OpError(op, None, f"{op}: pass {name}= (ckpt.config has none of {', '.join(CONFIG_NAMES[name])})")

    # -- experts ---------------------------------------------------------------------------

    def stack(self, pattern: str | Sequence[str], new_key: str, dim: int = 0, *, missing_ok: bool = False) -> None:
        """Stack per-expert tensors into one (``experts.(\\d+).w1.weight`` → ``experts.w1``).

        The pattern's last group is the index, which must run 0..n-1; earlier groups may be used in
        ``new_key`` (``layers.\\1.experts.w1``). A list of keys stacks exactly those, in that order.
        """
        groups: dict[str, list[tuple[int, str]]] = {}
        if isinstance(pattern, str):
            for k, m in self._match("stack", pattern, missing_ok):
                if m is None or not m.groups():
                    raise OpError("stack", pattern, f"stack: {pattern!r} needs a group that captures the index")
                groups.setdefault(m.expand(new_key), []).append((int(m.groups()[-1]), k))
        else:
            groups[new_key] = list(enumerate(pattern))
        for target, indexed in groups.items():
            indexed.sort()
            if [i for i, _ in indexed] != list(range(len(indexed))):
                raise OpError("stack", target, f"stack: the indices for {target!r} are {[i for i, _ in indexed]}, "
                                               "not 0..n-1")
            sources = [k for _, k in indexed]
            tensors = [self._tensor("stack", k) for k in sources]
            shapes = [shape_of(t) for t in tensors]
            if len(set(shapes)) != 1 or len({dtype_of(t) for t in tensors}) != 1:
                raise OpError("stack", sources[0], f"stack: {target!r} needs tensors of one shape and dtype, "
                                                   f"got {sorted({tuple(s) for s in shapes})}")
            out_shape = list(shapes[0])
            out_shape.insert(dim if dim >= 0 else len(out_shape) + dim + 1, len(sources))
            order = list(self._entries)
            places = [order.index(k) for k in sources]
            self._place(sources, [(target, Deferred(tuple(out_shape), dtype_of(tensors[0]),
                                                    partial(_stack_entries, tensors, dim)))])
            self.optimizers.transform(sources, [target], shapes[0], partial(_stack, dim=dim), shapes=shapes)
            self._record("stack", [*sources, target],
                         ["unstack", {"key": re.escape(target), "new_keys": sources, "dim": dim, "at": places}])

    def unstack(self, key: str, new_keys: str | Sequence[str], dim: int = 0, *, missing_ok: bool = False,
                at: Sequence[int] | None = None) -> None:
        """Split a fused expert tensor into one key per index: ``new_keys`` is a list, or a template
        with ``{i}`` (``layers.\\1.experts.{i}.w1.weight``).

        ``at`` puts the parts at these positions of the state dict instead of where the key was (the
        walk back of a ``stack`` passes the positions its keys had, so the order comes back too).
        """
        for k, m in self._match("unstack", key, missing_ok):
            src = self._tensor("unstack", k)
            shape = shape_of(src)
            try:
                n = shape[dim]
            except IndexError:
                raise OpError("unstack", k, f"unstack: {k!r} of shape {list(shape)} has no dim {dim}") from None
            if isinstance(new_keys, str):
                template = m.expand(new_keys) if m else new_keys
                targets = [template.replace("{i}", str(i)) for i in range(n)]
            else:
                targets = list(new_keys)
            if len(targets) != n:
                raise OpError("unstack", k, f"unstack: {k!r} has {n} entries along dim {dim}, "
                                            f"but {len(targets)} keys were named")
            clash = [t for t in targets if t in self._entries and t != k]
            if clash:
                raise OpError("unstack", k, f"unstack: {clash[0]!r} already exists")
            part_shape = tuple(s for i, s in enumerate(shape) if i != dim % len(shape))
            parts = [(t, Deferred(part_shape, dtype_of(src), partial(_select, src, dim, i)))
                     for i, t in enumerate(targets)]
            if at is not None and len(at) == len(parts):
                self._place_at(k, parts, at)
            else:
                self._place([k], parts)
            self.optimizers.transform([k], targets, shape, partial(_unstack, dim=dim))
            self._record("unstack", [k, *targets], ["stack", {"pattern": targets, "new_key": k, "dim": dim}])

    # -- attention -------------------------------------------------------------------------

    def permute_rope(self, key: str, n_heads: int | None = None, *, to: str = "hf", missing_ok: bool = False) -> None:
        """Reorder the rows of a q or k projection between Meta's interleaved RoPE layout and Hugging
        Face's half-split one (``to="hf"`` or ``"meta"``); for k pass the kv-head count."""
        if to not in ("hf", "meta"):
            raise OpError("permute_rope", key, f"permute_rope: to={to!r}; use 'hf' or 'meta'")
        heads = self._config_value("permute_rope", "n_heads", n_heads)
        for k in self._each("permute_rope", key, missing_ok):
            shape = shape_of(self._tensor("permute_rope", k))
            if not shape or shape[0] % (2 * heads):
                raise OpError("permute_rope", k, f"permute_rope: {k!r} of shape {list(shape)} does not have "
                                                 f"{heads} heads of an even size along dim 0")
            self._transform("permute_rope", k, shape, partial(_rope, n_heads=heads, to=to))
            back = "meta" if to == "hf" else "hf"
            self._record("permute_rope", [k], ["permute_rope", {"key": re.escape(k), "n_heads": heads, "to": back}])

    def split_qkv(self, key: str, new_keys: Sequence[str], *, n_heads: int | None = None,
                  n_kv_heads: int | None = None, head_dim: int | None = None, dim: int = 0,
                  missing_ok: bool = False) -> None:
        """Split a fused grouped-query ``qkv`` into q, k and v: sizes ``n_heads·head_dim`` and twice
        ``n_kv_heads·head_dim``, from the arguments or ``ckpt.config``."""
        heads = self._config_value("split_qkv", "n_heads", n_heads)
        try:
            kv = self._config_value("split_qkv", "n_kv_heads", n_kv_heads)
        except OpError:  # no kv-head count anywhere: plain multi-head attention
            kv = heads
        for k, m in self._match("split_qkv", key, missing_ok):
            length = shape_of(self._tensor("split_qkv", k))[dim]
            size = head_dim if head_dim is not None else length // (heads + 2 * kv)
            if size * (heads + 2 * kv) != length:
                raise OpError("split_qkv", k, f"split_qkv: {length} rows of {k!r} are not "
                                              f"({heads} + 2×{kv}) heads of one size")
            self.split(re.escape(k), [m.expand(t) if m else t for t in new_keys], dim=dim,
                       sizes=[heads * size, kv * size, kv * size])

    # -- shapes ----------------------------------------------------------------------------

    def interpolate(self, key: str, size: Sequence[int], *, mode: str = "bicubic", prefix_tokens: int = 0,
                    missing_ok: bool = False) -> None:
        """Resample a position embedding (``[1, prefix + h·w, d]`` or ``[prefix + h·w, d]``) to a new
        grid, or a conv kernel (``[out, in, kh, kw]``) to a new size; lossy, so irreversible."""
        import math

        new = tuple(int(s) for s in size)
        for k in self._each("interpolate", key, missing_ok):
            shape = shape_of(self._tensor("interpolate", k))
            if len(shape) == 4:
                out_shape = (*shape[:2], *new)
            elif len(shape) in (2, 3):
                cells = shape[-2] - prefix_tokens
                side = math.isqrt(cells)
                if side * side != cells or len(new) != 2:
                    raise OpError("interpolate", k, f"interpolate: {k!r} of shape {list(shape)} is not "
                                                    f"{prefix_tokens} prefix tokens and a square grid")
                out_shape = (*shape[:-2], prefix_tokens + new[0] * new[1], shape[-1])
            else:
                raise OpError("interpolate", k, f"interpolate: {k!r} of shape {list(shape)} is neither a "
                                                "position embedding nor a conv kernel")
            fn = partial(_interpolate, size=new, mode=mode, prefix_tokens=prefix_tokens)
            self.optimizers.transform([k], [k], shape, partial(_zero_moments, shape=out_shape))
            self._replace(k, _deferred(self._tensor("interpolate", k), out_shape, fn))
            self._record("interpolate", [k], None)

    def resize(self, key: str, shape: Sequence[int], *, init: str = "mean", std: float = 0.02, seed: int = 0,
               missing_ok: bool = False) -> None:
        """Grow or shrink a tensor (a vocabulary): kept elements stay, new ones are ``zeros``, the
        ``mean`` of the existing rows, or ``normal(0, std)`` (seeded). Growing is undone exactly."""
        if init not in ("zeros", "mean", "normal"):
            raise OpError("resize", key, f"resize: init={init!r}; use 'zeros', 'mean' or 'normal'")
        new = tuple(int(s) for s in shape)
        for k in self._each("resize", key, missing_ok):
            old = shape_of(self._tensor("resize", k))
            if len(new) != len(old):
                raise OpError("resize", k, f"resize: {k!r} has {len(old)} dims, the new shape {len(new)}")
            fn = partial(_resize, shape=new, init=init, std=std, seed=seed)
            self._fresh_state(k, old, new)
            self._replace(k, _deferred(self._tensor("resize", k), new, fn))
            grew = all(n >= o for n, o in zip(new, old, strict=True))
            self._record("resize", [k], ["resize", {"key": re.escape(k), "shape": list(old)}] if grew else None)

    # -- sharing ---------------------------------------------------------------------------

    def tie(self, key: str, source: str) -> None:
        """Make ``key`` the same tensor as ``source`` (an output head tied to the embedding). Its own
        values are dropped, so this is undone exactly only when they already were the source's."""
        src = self._tensor("tie", source)
        old = self._entries.get(key)
        same = old is src or (isinstance(old, TensorRef) and isinstance(src, TensorRef)
                              and (old.storage, old.storage_offset, old.shape, old.stride)
                              == (src.storage, src.storage_offset, src.shape, src.stride))
        if old is not None and shape_of(old) != shape_of(src):
            raise OpError("tie", key, f"tie: {key!r} of shape {list(shape_of(old))} cannot share "
                                      f"{source!r} of shape {list(shape_of(src))}")
        self._entries[key] = src
        self.optimizers.drop([key])  # a tied parameter is one parameter
        self._record("tie", [key], ["untie", {"key": key, "source": source}] if old is None or same else None)

    def untie(self, key: str, source: str) -> None:
        """Give ``key`` its own copy of ``source`` (a head no longer tied to the embedding)."""
        src = self._tensor("untie", source)
        self._entries[key] = Deferred(shape_of(src), dtype_of(src), lambda: to_torch(src).clone())
        self.optimizers.add([key])
        self._record("untie", [key], ["tie", {"key": key, "source": source}])

    # -- helpers ---------------------------------------------------------------------------

    def _place(self, sources: Sequence[str], new_items: Sequence[tuple[str, Any]]) -> None:
        """Replace ``sources`` by ``new_items`` where the first source was, keeping the order."""
        items = list(self._entries.items())
        position = [k for k, _ in items].index(sources[0])
        kept = [(k, v) for k, v in items if k not in sources]
        at = sum(1 for k, _ in items[:position] if k not in sources)
        self._entries.clear()
        for k, v in kept[:at] + list(new_items) + kept[at:]:
            self._entries[k] = v

    def _place_at(self, source: str, new_items: Sequence[tuple[str, Any]], at: Sequence[int]) -> None:
        """Replace ``source`` by ``new_items``, each at the position ``at`` gives it."""
        ordered = [(k, v) for k, v in self._entries.items() if k != source]
        for index, item in sorted(zip(at, new_items, strict=True), key=lambda p: p[0]):
            ordered.insert(index, item)
        self._entries.clear()
        for k, v in ordered:
            self._entries[k] = v

    def _fresh_state(self, key: str, old: tuple[int, ...], new: tuple[int, ...]) -> None:
        """Moments of kept elements stay; those of new or resampled elements start at zero."""
        self.optimizers.transform([key], [key], old, partial(_moments_to, shape=new))


def _deferred(src: Any, shape: tuple[int, ...], fn: Any) -> Deferred:
    return Deferred(shape, dtype_of(src), lambda: fn(to_torch(src)).contiguous())


def _stack_entries(entries: Sequence[Any], dim: int) -> torch.Tensor:
    import torch

    return torch.stack([to_torch(e) for e in entries], dim)


def _stack(ts: list[torch.Tensor], dim: int) -> list[torch.Tensor]:
    import torch

    return [torch.stack(ts, dim)]


def _unstack(ts: list[torch.Tensor], dim: int) -> list[torch.Tensor]:
    return [t.contiguous() for t in ts[0].unbind(dim)]


def _select(src: Any, dim: int, index: int) -> torch.Tensor:
    return to_torch(src).select(dim, index).contiguous()


def _rope(t: torch.Tensor, n_heads: int, to: str) -> torch.Tensor:
    """Meta → HF is convert_llama_weights_to_hf's ``permute``; HF → Meta is its inverse."""
    rows = t.shape[0]
    flat = t.reshape(rows, -1)
    half = rows // n_heads // 2
    if to == "hf":
        out = flat.view(n_heads, half, 2, -1).transpose(1, 2)
    else:
        out = flat.view(n_heads, 2, half, -1).transpose(1, 2)
    return out.reshape(t.shape)


def _interpolate(t: torch.Tensor, size: tuple[int, ...], mode: str, prefix_tokens: int) -> torch.Tensor:
    import math

    import torch.nn.functional as F

    if t.dim() == 4:
        return F.interpolate(t.float(), size=size, mode=mode, align_corners=False).to(t.dtype)
    lead = t.shape[:-2]
    flat = t.reshape(-1, t.shape[-2], t.shape[-1])
    prefix, grid = flat[:, :prefix_tokens], flat[:, prefix_tokens:]
    side = math.isqrt(grid.shape[1])
    image = grid.reshape(flat.shape[0], side, side, -1).permute(0, 3, 1, 2).float()
    resampled = F.interpolate(image, size=size, mode=mode, align_corners=False).to(t.dtype)
    cells = resampled.permute(0, 2, 3, 1).reshape(flat.shape[0], size[0] * size[1], -1)
    import torch

    return torch.cat([prefix, cells], dim=1).reshape(*lead, -1, t.shape[-1])


def _resize(t: torch.Tensor, shape: tuple[int, ...], init: str, std: float, seed: int) -> torch.Tensor:
    import torch

    if init == "normal":
        generator = torch.Generator().manual_seed(seed)
        out = torch.randn(shape, generator=generator, dtype=torch.float32).mul_(std).to(t.dtype)
    elif init == "mean" and t.dim() >= 1 and t.shape[0] > 0:
        out = t.float().mean(0, keepdim=True).to(t.dtype).expand(shape[0], *t.shape[1:])
        out = _fit(out, shape, torch.zeros(shape, dtype=t.dtype))
    else:
        out = torch.zeros(shape, dtype=t.dtype)
    return _fit(t, shape, out)


def _fit(t: torch.Tensor, shape: tuple[int, ...], out: torch.Tensor) -> torch.Tensor:
    """``out`` with the overlapping leading block of ``t`` copied in."""
    out = out.clone()
    block = tuple(slice(0, min(a, b)) for a, b in zip(t.shape, shape, strict=True))
    out[block] = t[block]
    return out


def _moments_to(ts: list[torch.Tensor], shape: tuple[int, ...]) -> list[torch.Tensor]:
    import torch

    return [_fit(ts[0], shape, torch.zeros(shape, dtype=ts[0].dtype))]


def _zero_moments(ts: list[torch.Tensor], shape: tuple[int, ...]) -> list[torch.Tensor]:
    import torch

    return [torch.zeros(shape, dtype=ts[0].dtype)]
