"""Object-based checkpoints (``tf.train.Checkpoint`` for Python trees) and saves that do not stall.

The package keeps one concern per module:

* ``_checkpoint``: :class:`Checkpoint`, its children, its saves and restores;
* ``_background``: the snapshot buffer and :class:`SaveHandle` of background saves;
* ``_restore``: matching a tree with a checkpoint's object graph, :class:`RestoreStatus`,
  :func:`load_nested`;
* ``_sync``: :class:`SyncCheckpoint`, the blocking face.
"""

from streamckpt.checkpoint._background import OnBusy, SaveHandle
from streamckpt.checkpoint._checkpoint import AfterCommit, Checkpoint
from streamckpt.checkpoint._restore import RestoreStatus, load_nested
from streamckpt.checkpoint._sync import SyncCheckpoint

__all__ = [
    "AfterCommit",
    "Checkpoint",
    "OnBusy",
    "RestoreStatus",
    "SaveHandle",
    "SyncCheckpoint",
    "load_nested",
]
