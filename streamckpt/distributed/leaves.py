"""Sharded framework leaves — torch ``DTensor`` and multi-device ``jax.Array`` — as pieces.

A job that shards its tensors with its framework should not have to wrap each one in a
:class:`~streamckpt.sharding.Slice`: the framework already knows which box of the full
tensor every process holds. This module reads that knowledge, without I/O:

* :func:`local_slices` (save) turns such a leaf into the ``Slice`` pieces this process
  contributes; the global planner tiles and dedups the pieces of all processes.
* :func:`local_boxes` and :func:`fill` (restore) say which boxes this process must read for
  a target leaf, then put what was read into it: in place for ``Slice`` and ``DTensor``
  targets, as a new array of the target's sharding for immutable ``jax.Array`` targets.

torch and jax are only looked at when already imported (a value of theirs cannot exist
otherwise), so importing this module pulls in neither.

Replicas: a ``DTensor`` gives its piece on every rank, replicas included (the planner
writes each distinct box once and may choose which replica writes it); a ``jax.Array``
gives only the shards with ``replica_id == 0``, as jax itself designates one copy. A piece
with no elements is still given on save (it carries the dtype and full shape), but never
listed for reading on restore: a reader is never asked for an empty box.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from streamckpt.errors import NamingError, UnsupportedError
from streamckpt.sharding import Box, Slice, box_shape

__all__ = ["fill", "local_boxes", "local_slices"]


def local_slices(value: Any) -> list[Slice] | None:
    """The pieces this process holds of a sharded framework leaf; None for any other value.

    A ``DTensor`` gives one ``Slice`` of its detached local tensor (possibly empty). A
    ``jax.Array`` spread over more than one device, or not fully addressable, gives one
    ``Slice`` per addressable shard with ``replica_id == 0`` (possibly none). Plain arrays,
    torch tensors and single-device jax arrays give None: they are whole tensors.
    """
    if _is_dtensor(value):
        box = _dtensor_box(value)
        if box is None:  # this rank is outside the DTensor's mesh: it holds nothing
            return []
        local = value.to_local().detach()
        shape = tuple(int(n) for n in local.shape)
        if shape != box_shape(box):
            raise UnsupportedError(
                f"DTensor placements {value.placements} on mesh {tuple(value.device_mesh.shape)} "
                f"give this rank a piece of shape {box_shape(box)}, but its local tensor has "
                f"shape {shape}; redistribute it to Shard/Replicate placements first"
            )
        return [Slice(local, full_shape=value.shape, offset=_offset(box))]
    if _is_sharded_jax(value):
        shape = tuple(int(n) for n in value.shape)
        return [
            Slice(shard.data, full_shape=shape, offset=_offset(_index_box(shard.index, shape)))
            for shard in value.addressable_shards
            if shard.replica_id == 0
        ]
    return None


def local_boxes(target: Any) -> list[Box] | None:
    """The boxes this process must read to restore ``target``, each distinct one once.

    None when ``target`` is neither a :class:`Slice` nor a sharded framework leaf (the
    caller restores it whole). Empty boxes are left out. :func:`fill` takes the arrays read
    for these boxes, in this order.
    """
    if isinstance(target, Slice):
        return [] if _is_empty(target.box) else [target.box]
    if _is_dtensor(target):
        box = _dtensor_box(target)
        return [] if box is None or _is_empty(box) else [box]
    if _is_sharded_jax(target):
        return _distinct(target)
    return None


def fill(target: Any, pieces: Sequence[np.ndarray[Any, Any]]) -> Any:
    """Put the arrays read for :func:`local_boxes` of ``target`` into it; the restored leaf.

    ``Slice`` (numpy or torch value) and ``DTensor`` targets are written in place and
    returned; a ``jax.Array`` is immutable, so a new array of the target's sharding and dtype
    is built and returned (a ``Slice`` holding one gets the new array as its value). A piece
    whose dtype does not cast to the target's within its kind (numpy's ``same_kind``), or
    whose shape is not its box's, raises :class:`NamingError`.
    """
    boxes = local_boxes(target)
    if boxes is None:
        raise UnsupportedError(
            f"{type(target).__name__} is neither a Slice nor a sharded framework leaf"
        )
    if len(pieces) != len(boxes):
        raise NamingError(f"{len(boxes)} boxes to fill, but {len(pieces)} pieces were read")
    if isinstance(target, Slice):
        if boxes:
            target.value = _fill_array(target.value, pieces[0], boxes[0])
        return target
    if _is_dtensor(target):
        if boxes:
            _fill_array(target.to_local(), pieces[0], boxes[0])
        return target
    return _fill_jax(target, boxes, pieces)


# --- torch DTensor -----------------------------------------------------------------------


def _is_dtensor(value: Any) -> bool:
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None)
    return dtensor is not None and isinstance(value, dtensor)


def _dtensor_box(dtensor: Any) -> Box | None:
    """The box of a DTensor that this rank holds, or None when the rank is not in its mesh.

    Matches ``torch.distributed.tensor._utils.compute_local_shape_and_global_offset``: each
    ``Shard(dim)`` splits the current extent of ``dim`` like ``torch.chunk`` (chunks of
    ``ceil(n / k)``; trailing chunks may be smaller or empty), mesh dims applied left to
    right, so a later mesh dim sharding the same tensor dim splits the earlier's chunk. An
    empty extent starts at the axis's full length, as torch puts it. Computed here rather
    than called, because that function is private and its signature has moved between
    releases; the tests check this against real DTensors.
    """
    from torch.distributed.tensor import Partial, Replicate, Shard

    mesh = dtensor.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return None
    full = tuple(int(n) for n in dtensor.shape)
    placements = tuple(dtensor.placements)
    _check_shard_order(dtensor, placements)
    start = [0] * len(full)
    length = list(full)
    for mesh_dim, placement in enumerate(placements):
        if type(placement) is Replicate:
            continue
        if isinstance(placement, Partial):
            raise UnsupportedError(
                f"a DTensor with a Partial placement ({placements}) holds unreduced values; "
                f"redistribute it first, e.g. dtensor.redistribute(placements=[Replicate() "
                f"or Shard(d) ...]), then save"
            )
        if type(placement) is not Shard:
            raise UnsupportedError(
                f"DTensor placement {placement!r} (in {placements}) is not supported; "
                f"redistribute to Shard/Replicate placements first"
            )
        dim = placement.dim % len(full) if full else placement.dim
        chunks = int(mesh.shape[mesh_dim])
        size = -(-length[dim] // chunks)  # ceil, as torch.chunk
        lo = min(length[dim], size * int(coordinate[mesh_dim]))
        hi = min(length[dim], lo + size)
        start[dim] += lo
        length[dim] = hi - lo
    return tuple(
        (n, n) if span == 0 else (lo, lo + span)
        for lo, span, n in zip(start, length, full, strict=True)
    )


def _check_shard_order(dtensor: Any, placements: tuple[Any, ...]) -> None:
    """Refuse a DTensor whose shards of one tensor dim nest in other than mesh-dim order.

    Newer torch lets a spec carry a ``shard_order``; the arithmetic above assumes the
    default (left to right), which is all that plain ``Shard`` placements express.
    """
    spec = getattr(dtensor, "_spec", None)
    order = getattr(spec, "shard_order", None)
    default = getattr(type(spec), "compute_default_shard_order", None)
    if order is not None and default is not None and tuple(order) != tuple(default(placements)):
        raise UnsupportedError(
            f"DTensor shard order {order} is not the default for placements {placements}; "
            f"redistribute it first"
        )


# --- jax -----------------------------------------------------------------------------------


def _is_sharded_jax(value: Any) -> bool:
    jax = sys.modules.get("jax")
    array = getattr(jax, "Array", None)
    if array is None or not isinstance(value, array):
        return False
    return len(value.sharding.device_set) > 1 or not value.is_fully_addressable


def _index_box(index: tuple[slice, ...], shape: tuple[int, ...]) -> Box:
    """The box of a jax shard index: a tuple of slices, ``slice(None)`` for a whole axis."""
    box = []
    for axis, n in enumerate(shape):
        part = index[axis] if axis < len(index) else slice(None)
        lo, hi, step = part.indices(n)
        if step != 1:
            raise UnsupportedError(f"jax shard index {index} has a strided axis {axis}")
        box.append((lo, max(lo, hi)))
    return tuple(box)


def _jax_device_boxes(array: Any) -> dict[Any, Box]:
    """The box of every addressable device of the array's sharding, in the sharding's order."""
    shape = tuple(int(n) for n in array.shape)
    indices = array.sharding.addressable_devices_indices_map(shape)
    return {device: _index_box(index, shape) for device, index in indices.items()}


def _distinct(array: Any) -> list[Box]:
    boxes: dict[Box, None] = {}
    for box in _jax_device_boxes(array).values():
        if not _is_empty(box):
            boxes.setdefault(box)
    return list(boxes)


def _fill_jax(target: Any, boxes: list[Box], pieces: Sequence[np.ndarray[Any, Any]]) -> Any:
    """A new array of ``target``'s sharding and dtype, each device given its box's piece."""
    import jax

    dtype = np.dtype(target.dtype)
    by_box = {
        box: _cast(piece, dtype, box_shape(box)) for box, piece in zip(boxes, pieces, strict=True)
    }
    shape = tuple(int(n) for n in target.shape)
    arrays = []
    for device, box in _jax_device_boxes(target).items():
        host = by_box[box] if box in by_box else np.zeros(box_shape(box), dtype)
        arrays.append(jax.device_put(host, device))
    return jax.make_array_from_single_device_arrays(shape, target.sharding, arrays)


# --- shared --------------------------------------------------------------------------------


def _fill_array(value: Any, piece: np.ndarray[Any, Any], box: Box) -> Any:
    """Write ``piece`` into a numpy array or torch tensor in place; a jax value is rebuilt."""
    from streamckpt.frameworks import is_torch_tensor, torch_copy_into, torch_to_numpy

    if is_torch_tensor(value):
        import torch

        dtype = torch_to_numpy(torch.empty(0, dtype=value.dtype)).dtype
        source = _cast(piece, dtype, box_shape(box))
        torch_copy_into(value, source)
        return value
    if isinstance(value, np.ndarray) and value.flags.writeable:
        value[...] = _cast(piece, value.dtype, box_shape(box))
        return value
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(value, jax.Array) and value.is_fully_addressable:
        return jax.device_put(_cast(piece, np.dtype(value.dtype), box_shape(box)), value.sharding)
    raise UnsupportedError(
        f"cannot fill a {type(value).__name__} in place; give a Slice a writable numpy "
        f"array, a torch tensor or a jax array"
    )


def _cast(piece: np.ndarray[Any, Any], dtype: np.dtype[Any], shape: tuple[int, ...]) -> Any:
    piece = np.asarray(piece)
    if tuple(piece.shape) != shape:
        raise NamingError(
            f"a piece of shape {list(piece.shape)} read for a box of shape {list(shape)}"
        )
    if not np.can_cast(piece.dtype, dtype, casting="same_kind"):
        raise NamingError(
            f"a piece of dtype {piece.dtype} (shape {list(piece.shape)}) does not cast to "
            f"the target's {dtype}"
        )
    return piece if piece.dtype == dtype else piece.astype(dtype)


def _offset(box: Box) -> tuple[int, ...]:
    return tuple(lo for lo, _ in box)


def _is_empty(box: Box) -> bool:
    return any(hi <= lo for lo, hi in box)
