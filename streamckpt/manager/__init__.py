"""Numbered checkpoints in one directory, a retention policy, and resume after preemption.

* ``_manager``: :class:`CheckpointManager` (state, saves, publication, restore);
* ``_files``: what a managed directory holds and the I/O over it (:func:`latest_checkpoint`);
* ``_sync``: :class:`SyncCheckpointManager`, the blocking face.

The retention policy itself is pure and lives in :mod:`streamckpt.retention`.
"""

from streamckpt.manager._files import (
    METRICS_FILENAME,
    STATE_FILENAME,
    SkippedCheckpoint,
    latest_checkpoint,
)
from streamckpt.manager._manager import CheckpointManager, ManagedCheckpoint
from streamckpt.manager._sync import SyncCheckpointManager

__all__ = [
    "METRICS_FILENAME",
    "STATE_FILENAME",
    "CheckpointManager",
    "ManagedCheckpoint",
    "SkippedCheckpoint",
    "SyncCheckpointManager",
    "latest_checkpoint",
]
