"""What this process holds, as the planner sees it: items and payloads, never sent data.

A value may be a :class:`~streamckpt.sharding.Slice`, a list of them, a sharded framework
leaf (``DTensor``, multi-device ``jax.Array``) or anything the single-process save takes.
Every device array's transfer to the host is started before the first is waited for.
"""

from __future__ import annotations

import math
from typing import Any

from streamckpt.device import is_device_array, start_transfer, start_transfers
from streamckpt.distributed.items import LocalItem
from streamckpt.distributed.leaves import local_slices
from streamckpt.errors import StreamCkptError
from streamckpt.format.bundle import key_to_name, name_to_key
from streamckpt.pipeline.save import Tensors
from streamckpt.pipeline.tensors import PreparedTensor, prepare
from streamckpt.sharding import Slice, box_size

__all__ = ["pieces_of", "prepare_local"]


def prepare_local(tensors: Tensors, *, copy: bool) -> tuple[list[LocalItem], dict[bytes, Any]]:
    """The items and payloads of this process, keyed by the index key each will be stored under.

    A value may be a :class:`Slice`, a list of them, a sharded framework leaf (``DTensor``,
    multi-device ``jax.Array``) or anything the single-process save takes (a whole value).
    A piece with no elements is left out (it holds nothing and TensorFlow's slices are never
    empty), unless the whole tensor has none: that is then a whole (empty) value.
    """
    items: list[LocalItem] = []
    prepared: dict[bytes, PreparedTensor] = {}
    # every device array's transfer to the host is started before the first is waited for
    given = {name: _pieces(value) for name, value in tensors.items()}
    for pieces in given.values():
        if pieces is None:
            continue
        for i, piece in enumerate(pieces):
            if is_device_array(piece.value):
                pieces[i] = Slice(
                    start_transfer(piece.value), full_shape=piece.full_shape, offset=piece.offset
                )
    tensors = start_transfers(
        {name: value for name, value in tensors.items() if given[name] is None}
    )
    for name, pieces in given.items():
        value = tensors.get(name)
        key = name_to_key(name)
        if not key:
            raise ValueError("a tensor name must not be empty (it is the header's key)")
        try:
            if pieces is None:
                tensor = prepare(key, value, copy=copy)
                _add(items, prepared, LocalItem(key, tensor.dtype, tensor.shape, None, 0), tensor)
                continue
            for piece in pieces:
                whole = piece.is_whole or math.prod(piece.full_shape) == 0
                if not whole and box_size(piece.box) == 0:
                    continue
                box = None if whole else piece.box
                tensor = prepare(key, piece.value, copy=copy)
                item = LocalItem(key, tensor.dtype, piece.full_shape, box, 0)
                _add(items, prepared, item, tensor)
        except StreamCkptError as exc:
            raise exc.with_context(tensor=key_to_name(key)) from None
    items.sort(key=lambda item: item.key)
    return items, prepared


def pieces_of(value: Any) -> list[Slice] | None:
    """The pieces a value stands for, or None for a whole value."""
    return _pieces(value)


def _pieces(value: Any) -> list[Slice] | None:
    """A new list of the pieces a value stands for (None: a whole value)."""
    if isinstance(value, Slice):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, Slice) for v in value):
        return list(value)
    return local_slices(value)


def _add(
    items: list[LocalItem],
    prepared: dict[bytes, PreparedTensor],
    item: LocalItem,
    tensor: PreparedTensor,
) -> None:
    item = LocalItem(item.name, item.dtype, item.full_shape, item.box, tensor.size)
    key = item.key
    if key in prepared:
        raise ValueError(f"{key_to_name(item.name)!r} is given twice with the same box")
    prepared[key] = tensor
    items.append(item)
