"""streamckpt: TensorFlow v2 checkpoints through an async streaming pipeline.

Any fsspec filesystem works: local disk, ``memory://``, ``gs://``, ``s3://``.

```python
info = await streamckpt.save("gs://b/run/ckpt-7", {"dense/kernel": a}, num_shards=4)
arrays = await streamckpt.load("gs://b/run/ckpt-7")
x = await streamckpt.read_tensor("gs://b/run/ckpt-7", "dense/kernel")
async with streamckpt.open("gs://b/run/ckpt-7") as ckpt:
    part = await ckpt.read("dense/kernel", index=np.s_[100:200])
```

Blocking versions of the same functions live in :mod:`streamckpt.sync`.
"""

from typing import TYPE_CHECKING, Any

from streamckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ChecksumError,
    CoordinationError,
    CorruptCheckpointError,
    NameMismatchError,
    NamingError,
    ObjectMatchError,
    PermissionDeniedError,
    RetriesExhaustedError,
    SaveInProgressError,
    StorageError,
    StreamCkptError,
    TensorNotFoundError,
    TruncatedError,
    UnsupportedError,
    ValueMismatchError,
)

if TYPE_CHECKING:
    from streamckpt.api import list_tensors, load, open, read_tensor, save
    from streamckpt.checkpoint import Checkpoint, RestoreStatus, SaveHandle, load_nested
    from streamckpt.format.dtypes import DataType
    from streamckpt.manager import CheckpointManager, latest_checkpoint
    from streamckpt.naming import assign_into, flatten, identity_map, lookup_map, unflatten
    from streamckpt.pipeline.bytewise import copy_checkpoint, verify_checkpoint
    from streamckpt.pipeline.index import clear_index_cache
    from streamckpt.pipeline.info import TensorInfo
    from streamckpt.pipeline.read import CheckpointReader
    from streamckpt.pipeline.save import SaveInfo
    from streamckpt.pipeline.tensors import Deferred, Typed
    from streamckpt.sharding import Slice

# The I/O layers load on first use, so that ``import streamckpt.format`` (pure, no I/O)
# pulls in neither anyio nor fsspec.
_LAZY = {
    "list_tensors": "streamckpt.api",
    "load": "streamckpt.api",
    "open": "streamckpt.api",
    "read_tensor": "streamckpt.api",
    "save": "streamckpt.api",
    "DataType": "streamckpt.format.dtypes",
    "CheckpointReader": "streamckpt.pipeline.read",
    "TensorInfo": "streamckpt.pipeline.info",
    "SaveInfo": "streamckpt.pipeline.save",
    "Typed": "streamckpt.pipeline.tensors",
    "Deferred": "streamckpt.pipeline.tensors",
    "Slice": "streamckpt.sharding",
    "Checkpoint": "streamckpt.checkpoint",
    "RestoreStatus": "streamckpt.checkpoint",
    "SaveHandle": "streamckpt.checkpoint",
    "load_nested": "streamckpt.checkpoint",
    "CheckpointManager": "streamckpt.manager",
    "latest_checkpoint": "streamckpt.manager",
    "assign_into": "streamckpt.naming",
    "flatten": "streamckpt.naming",
    "identity_map": "streamckpt.naming",
    "lookup_map": "streamckpt.naming",
    "unflatten": "streamckpt.naming",
    "clear_index_cache": "streamckpt.pipeline.index",
    "copy_checkpoint": "streamckpt.pipeline.bytewise",
    "verify_checkpoint": "streamckpt.pipeline.bytewise",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'streamckpt' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "CheckpointExistsError",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointReader",
    "ChecksumError",
    "CoordinationError",
    "CorruptCheckpointError",
    "DataType",
    "Deferred",
    "NameMismatchError",
    "NamingError",
    "ObjectMatchError",
    "PermissionDeniedError",
    "RestoreStatus",
    "RetriesExhaustedError",
    "SaveHandle",
    "SaveInProgressError",
    "SaveInfo",
    "Slice",
    "StorageError",
    "StreamCkptError",
    "TensorInfo",
    "TensorNotFoundError",
    "TruncatedError",
    "Typed",
    "UnsupportedError",
    "ValueMismatchError",
    "assign_into",
    "clear_index_cache",
    "copy_checkpoint",
    "flatten",
    "identity_map",
    "latest_checkpoint",
    "list_tensors",
    "load",
    "load_nested",
    "lookup_map",
    "open",
    "read_tensor",
    "save",
    "unflatten",
    "verify_checkpoint",
]
