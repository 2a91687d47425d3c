"""Framework tensors as leaves, without importing any framework until one is seen.

torch has dtypes numpy lacks (bfloat16, float8): its ``numpy()`` and ``__array__`` refuse
them, and DLPack export refuses them in numpy. A tensor of such a dtype is viewed as the
unsigned/signed integer of its width and then as the matching ``ml_dtypes`` type: the same
bytes, no copy for a CPU tensor. Restoring goes the same way back and writes into the tensor
in place (``copy_`` under ``no_grad``), so parameters keep their identity, device and
``requires_grad``.
"""

from __future__ import annotations

import sys
from typing import Any, cast

import numpy as np

from streamckpt.errors import UnsupportedError

__all__ = ["is_torch_tensor", "torch_copy_into", "torch_to_numpy"]

# torch dtype name -> (torch integer dtype name of the same width, ml_dtypes type name)
_BIT_VIEWS = {
    "bfloat16": ("int16", "bfloat16"),
    "float8_e4m3fn": ("uint8", "float8_e4m3fn"),
    "float8_e5m2": ("uint8", "float8_e5m2"),
    "float8_e4m3fnuz": ("uint8", "float8_e4m3fnuz"),
    "float8_e5m2fnuz": ("uint8", "float8_e5m2fnuz"),
}


def is_torch_tensor(x: Any) -> bool:
    """Whether ``x`` is a torch tensor (torch is only looked at if already imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _dtype_name(tensor: Any) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def torch_to_numpy(tensor: Any) -> np.ndarray[Any, Any]:
    """A host numpy array with the tensor's bytes; a view for CPU tensors numpy can map."""
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise UnsupportedError(f"{type(tensor).__name__} is not a torch tensor")
    host = tensor.detach()
    if host.device.type != "cpu":
        host = host.cpu()
    host = host.resolve_conj().resolve_neg()
    view = _BIT_VIEWS.get(_dtype_name(host))
    try:
        if view is None:
            return host.numpy()
        import ml_dtypes

        bits = host.view(getattr(torch, view[0])).numpy()
        return bits.view(getattr(ml_dtypes, view[1]))
    except (TypeError, RuntimeError) as exc:
        raise UnsupportedError(f"cannot save a torch tensor of dtype {host.dtype}: {exc}") from exc


def torch_numpy_dtype(tensor: Any) -> np.dtype[Any]:
    """The numpy dtype a torch tensor's values take (bfloat16 and float8 via ml_dtypes).

    Asked of an empty tensor of that dtype, so that it works for any tensor, subclasses
    (``DTensor``) and device tensors included, without touching its data.
    """
    import torch

    empty = torch_to_numpy(torch.empty((0,), dtype=tensor.dtype))
    return cast("np.dtype[Any]", empty.dtype)


def torch_copy_into(tensor: Any, value: np.ndarray[Any, Any]) -> None:
    """Write ``value`` into ``tensor`` in place, casting to its dtype and moving to its device."""
    import torch

    source = np.ascontiguousarray(value)
    if not source.flags.writeable:
        source = source.copy()  # torch.from_numpy warns about read-only memory
    view = _BIT_VIEWS.get(str(source.dtype))
    if view is not None:  # an ml_dtypes array: hand torch the bits, then its own dtype
        width = np.dtype(view[0])
        incoming = torch.from_numpy(source.view(width)).view(getattr(torch, str(source.dtype)))
    elif source.dtype.kind == "V" or source.dtype == object:
        raise UnsupportedError(f"cannot restore {source.dtype} values into a torch tensor")
    else:
        incoming = torch.from_numpy(source)
    with torch.no_grad():
        tensor.copy_(incoming)
