"""Batch trees: measure, slice, tile, join and move arbitrary batches along dim 0.

A *batch* is a tensor, or a (named) tuple, list, mapping or dataclass of batches, nested
to any depth. A list whose items are all plain values (``str``, numbers, ``None``), or
all lists of plain values (ragged token lists, as in a Hugging Face ``datasets`` batch),
is a per-sample leaf: it is sliced and joined like a tensor. So is a mapping's list of
tensors whose lengths differ (a ``datasets`` batch in torch format with ragged rows): it
becomes a :class:`RaggedList`, one tensor per sample, moved tensor by tensor. Any other
plain value (a scalar, a string) is a constant: copied as is into every piece.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from autoaccum.errors import BatchError

__all__ = [
    "RaggedList",
    "batch_size",
    "concat_batches",
    "map_tensors",
    "resize_batch",
    "slice_batch",
    "split_batch",
    "to_device",
]

_PLAIN = (str, bytes, int, float, bool, type(None))


def _is_plain(obj: object) -> bool:
    """A plain value, or a (possibly nested) list or tuple of them: one sample's data."""
    if isinstance(obj, _PLAIN):
        return True
    return isinstance(obj, (list, tuple)) and all(_is_plain(x) for x in obj)


class RaggedList(list):  # type: ignore[type-arg]
    """One tensor per sample, of different lengths: a per-sample leaf (its slices stay one)."""

    def __getitem__(self, index: Any) -> Any:
        item = super().__getitem__(index)
        return RaggedList(item) if isinstance(index, slice) else item


def _is_ragged(obj: object) -> bool:
    """A list of tensors whose first dimensions differ: one tensor per sample (a mapping's
    ragged column), never a tuple-like structure of batches (those agree on dim 0)."""
    if isinstance(obj, RaggedList):
        return True
    if not isinstance(obj, list) or len(obj) < 2:
        return False
    if not all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in obj):
        return False
    return len({x.shape[0] for x in obj}) > 1


def _is_sample_list(obj: object) -> bool:
    """A list of per-sample values: ``[0, 1, 1]``, ``["a", "b"]``, ``[[101, 7], [101]]``, or a
    :class:`RaggedList` of tensors."""
    if isinstance(obj, RaggedList):
        return True
    return isinstance(obj, list) and len(obj) > 0 and all(_is_plain(x) for x in obj)


def _ragged_values(batch: Mapping[Any, Any]) -> dict[Any, Any]:
    """A mapping's entries with its ragged columns as :class:`RaggedList` s."""
    return {k: RaggedList(v) if _is_ragged(v) else v for k, v in batch.items()}


def _is_dataclass_batch(obj: object) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _fields_of(batch: Any) -> dict[str, Any]:
    return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}


def _rebuild_dataclass(template: Any, items: dict[str, Any]) -> Any:
    """A copy of the dataclass ``template`` holding ``items`` (frozen ones included)."""
    try:
        return dataclasses.replace(template, **items)
    except (TypeError, ValueError):  # fields with init=False: set them on a copy
        clone = copy.copy(template)
        for name, value in items.items():
            object.__setattr__(clone, name, value)
        return clone


def _rebuild(template: Any, items: Sequence[Any]) -> Any:
    if isinstance(template, tuple) and hasattr(template, "_fields"):  # namedtuple
        return type(template)(*items)
    if isinstance(template, tuple):
        return tuple(items)
    return list(items)


def _rebuild_mapping(template: Mapping[Any, Any], items: dict[Any, Any]) -> Any:
    try:
        factory: Any = type(template)
        return factory(items)
    except Exception:  # a Mapping type whose constructor takes something else
        return items


def _leaf_sizes(batch: Any, path: str, out: list[tuple[str, int]]) -> None:
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            raise BatchError(
                f"a batch holds a 0-dimensional tensor{' at ' + path if path else ''}, which has "
                "no batch dimension to split; give every per-sample tensor a leading batch "
                "dimension"
            )
        out.append((path, batch.shape[0]))
    elif _is_sample_list(batch):
        out.append((path, len(batch)))
    elif isinstance(batch, Mapping):
        for key, value in _ragged_values(batch).items():
            _leaf_sizes(value, f"{path}[{key!r}]", out)
    elif _is_dataclass_batch(batch):
        for name, value in _fields_of(batch).items():
            _leaf_sizes(value, f"{path}.{name}", out)
    elif isinstance(batch, (tuple, list)):
        for i, value in enumerate(batch):
            _leaf_sizes(value, f"{path}[{i}]", out)


def batch_size(batch: Any) -> int:
    """The number of samples in ``batch``: the shared size of dim 0 of its leaves.

    Raises :class:`BatchError` when the batch holds no tensor or per-sample list,
    or when its leaves disagree on dim 0.
    """
    sizes: list[tuple[str, int]] = []
    _leaf_sizes(batch, "", sizes)
    if not sizes:
        raise BatchError(
            f"cannot find a batch dimension in a {type(batch).__name__}: it holds no tensor and "
            "no per-sample list (a batch is a tensor, or a tuple, list, dict or dataclass of "
            "tensors or per-sample lists)"
        )
    if len({n for _, n in sizes}) != 1:
        listed = ", ".join(f"{path or 'the batch'} has {n}" for path, n in sizes[:6])
        raise BatchError(
            f"the entries of this batch disagree on how many samples it holds ({listed}); every "
            "per-sample tensor or list must have the same length along its first dimension"
        )
    return sizes[0][1]


def map_tensors(batch: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply ``fn`` to every leaf that has a batch dimension; keep constants as they are."""
    if isinstance(batch, torch.Tensor) or _is_sample_list(batch):
        return fn(batch)
    if isinstance(batch, Mapping):
        items = _ragged_values(batch).items()
        return _rebuild_mapping(batch, {k: map_tensors(v, fn) for k, v in items})
    if _is_dataclass_batch(batch):
        return _rebuild_dataclass(
            batch, {k: map_tensors(v, fn) for k, v in _fields_of(batch).items()}
        )
    if isinstance(batch, (tuple, list)):
        return _rebuild(batch, [map_tensors(v, fn) for v in batch])
    return batch


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Samples ``[start, stop)`` of ``batch`` (views for tensors, no copy)."""
    return map_tensors(batch, lambda leaf: leaf[start:stop])


def split_batch(batch: Any, sizes: Sequence[int]) -> list[Any]:
    """Split ``batch`` along dim 0 into consecutive pieces of the given sizes."""
    total = batch_size(batch)
    if sum(sizes) != total:
        raise BatchError(f"cannot split a batch of {total} samples into pieces of {list(sizes)}")
    pieces, start = [], 0
    for size in sizes:
        pieces.append(slice_batch(batch, start, start + size))
        start += size
    return pieces


def _tile_leaf(leaf: Any, n: int) -> Any:
    have = len(leaf)
    reps = -(-n // have)
    if isinstance(leaf, torch.Tensor):
        if reps > 1:
            leaf = leaf.repeat(reps, *([1] * (leaf.dim() - 1)))
        return leaf[:n].contiguous()
    tiled = (list(leaf) * reps)[:n]
    return RaggedList(tiled) if isinstance(leaf, RaggedList) else tiled


def resize_batch(batch: Any, n: int) -> Any:
    """``batch`` with exactly ``n`` samples: its first ``n``, or its samples repeated in order."""
    if n <= 0:
        raise BatchError(f"cannot resize a batch to {n} samples; the size must be positive")
    if batch_size(batch) == 0:
        raise BatchError("cannot resize an empty batch: it holds no sample to repeat")
    return map_tensors(batch, lambda leaf: _tile_leaf(leaf, n))


def _join(leaves: list[Any]) -> Any:
    if any(isinstance(x, RaggedList) for x in leaves):  # a stacked batch joins as its rows
        return RaggedList(
            row
            for leaf in leaves
            for row in (leaf.unbind(0) if isinstance(leaf, torch.Tensor) else leaf)
        )
    first = leaves[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(x, torch.Tensor) for x in leaves):
            raise BatchError(
                "cannot join batches: a tensor in one batch is not a tensor in another"
            )
        shapes = {tuple(x.shape[1:]) for x in leaves}
        if len(shapes) != 1:
            raise BatchError(
                f"cannot join batches whose samples have different shapes {sorted(shapes)} "
                "(ragged batches, e.g. padded to different lengths). Pass a DataLoader over a "
                "map-style dataset (one with __getitem__ and __len__) with your padding "
                "collate_fn: autoaccum then collates each micro-batch itself. Batches that "
                "arrive collated (a list, a generator, an IterableDataset) can only be split "
                "and joined along dim 0, so pad those to a fixed length"
            )
        return torch.cat(leaves, dim=0)
    joined: list[Any] = []
    for leaf in leaves:
        joined.extend(leaf)
    return joined


def concat_batches(batches: Sequence[Any]) -> Any:
    """Join batches of the same structure along dim 0."""
    if not batches:
        raise BatchError("cannot join an empty list of batches")
    if len(batches) == 1:
        return batches[0]
    first = batches[0]
    if isinstance(first, torch.Tensor) or _is_sample_list(first):
        return _join(list(batches))
    if isinstance(first, Mapping):
        keys = list(first.keys())
        if any(not isinstance(b, Mapping) or list(b.keys()) != keys for b in batches):
            raise BatchError("cannot join batches whose dictionaries have different keys")
        values = [_ragged_values(b) for b in batches]
        return _rebuild_mapping(first, {k: concat_batches([v[k] for v in values]) for k in keys})
    if _is_dataclass_batch(first):
        if any(type(b) is not type(first) for b in batches):
            raise BatchError("cannot join batches of different dataclass types")
        fields = [_fields_of(b) for b in batches]
        joined = {k: concat_batches([f[k] for f in fields]) for k in fields[0]}
        return _rebuild_dataclass(first, joined)
    if isinstance(first, (tuple, list)):
        if any(not isinstance(b, (tuple, list)) or len(b) != len(first) for b in batches):
            raise BatchError("cannot join batches of different structure (tuple lengths differ)")
        return _rebuild(first, [concat_batches([b[i] for b in batches]) for i in range(len(first))])
    return first


def to_device(batch: Any, device: torch.device, *, non_blocking: bool = False) -> Any:
    """Move every tensor of ``batch`` to ``device``."""

    def move(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):
            return leaf.to(device, non_blocking=non_blocking)
        if isinstance(leaf, RaggedList):
            return RaggedList(x.to(device, non_blocking=non_blocking) for x in leaf)
        return leaf

    return map_tensors(batch, move)
