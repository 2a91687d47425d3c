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

from streamckpt.api import load, open, read_tensor, save
from streamckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ChecksumError,
    CorruptCheckpointError,
    PermissionDeniedError,
    SaveInProgressError,
    StorageError,
    StreamCkptError,
    TensorNotFoundError,
    TruncatedError,
    UnsupportedError,
)
from streamckpt.format.dtypes import DataType
from streamckpt.pipeline.read import CheckpointReader, TensorInfo
from streamckpt.pipeline.save import SaveInfo
from streamckpt.pipeline.tensors import Typed

__version__ = "0.1.0"

__all__ = [
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "CheckpointReader",
    "ChecksumError",
    "CorruptCheckpointError",
    "DataType",
    "PermissionDeniedError",
    "SaveInProgressError",
    "SaveInfo",
    "StorageError",
    "StreamCkptError",
    "TensorInfo",
    "TensorNotFoundError",
    "TruncatedError",
    "Typed",
    "UnsupportedError",
    "load",
    "open",
    "read_tensor",
    "save",
]
