"""Many processes, one checkpoint: coordinators over the job's own distributed engine.

```python
from streamckpt.distributed import TorchCoordinator
info = await streamckpt.save(prefix, tensors, coordinator=TorchCoordinator())
```

* :class:`TorchCoordinator` — ``torch.distributed`` (the default process group or one given;
  a gloo group for its small messages when the job's group is NCCL);
* :class:`JaxCoordinator` — ``jax.distributed`` (multi-controller JAX);
* :class:`StorageCoordinator` — only the checkpoint's own store (small part-files polled with
  backoff), for jobs without a collective library.

Each is imported on first use, so that ``import streamckpt.distributed`` pulls in neither
torch nor jax.
"""

from typing import TYPE_CHECKING, Any

from streamckpt.distributed._protocol import DEFAULT_TIMEOUT, Coordinator

if TYPE_CHECKING:
    from streamckpt.distributed.jax_coordinator import JaxCoordinator
    from streamckpt.distributed.storage_coordinator import StorageCoordinator
    from streamckpt.distributed.torch_coordinator import TorchCoordinator

_LAZY = {
    "JaxCoordinator": "streamckpt.distributed.jax_coordinator",
    "StorageCoordinator": "streamckpt.distributed.storage_coordinator",
    "TorchCoordinator": "streamckpt.distributed.torch_coordinator",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'streamckpt.distributed' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_TIMEOUT",
    "Coordinator",
    "JaxCoordinator",
    "StorageCoordinator",
    "TorchCoordinator",
]
