"""The ``checkpoint`` state file of a checkpoint directory, and the manager's metrics sidecar.

Pure: bytes in, values out, and back; no I/O.

The state file is a text-format ``CheckpointState`` (spec section 12). TensorFlow writes it
with Python protobuf's ``text_format.MessageToString``; :func:`encode_state` reproduces that
printer byte for byte (tests compare it with protobuf and with files real TensorFlow wrote), so
a directory managed by streamckpt looks exactly like one managed by TensorFlow. Parsing goes
through protobuf's own text parser, the one TensorFlow uses, so every spelling TensorFlow
accepts is accepted here; unknown fields are skipped rather than rejected.

TensorFlow's parser rejects unknown fields, so data TensorFlow has no field for (metrics per
checkpoint, for keep-best retention) lives in a JSON sidecar beside the state file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import text_format

from streamckpt.errors import CorruptCheckpointError
from streamckpt.proto import checkpoint_state_pb2

__all__ = [
    "METRICS_FORMAT",
    "CheckpointState",
    "decode_metrics",
    "decode_state",
    "encode_metrics",
    "encode_state",
]

METRICS_FORMAT = "streamckpt.checkpoint_metrics.v1"

# protobuf's text escapes (text_encoding.CEscape with as_utf8=True, its default): ASCII control
# characters as three-digit octal, the quotes and backslash escaped, non-ASCII left as UTF-8.
_ESCAPES = {i: f"\\{i:03o}" for i in (*range(32), 127)} | {
    ord("\t"): "\\t",
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord('"'): '\\"',
    ord("'"): "\\'",
    ord("\\"): "\\\\",
}


@dataclass(frozen=True, slots=True)
class CheckpointState:
    """What the state file says; paths exactly as written (usually relative to its directory).

    ``all_model_checkpoint_paths`` runs oldest first and ends with ``model_checkpoint_path``
    when written by a manager; ``all_model_checkpoint_timestamps`` (seconds since the epoch)
    runs parallel to it or is empty (``tf.train.Checkpoint.save`` writes none).
    """

    model_checkpoint_path: str
    all_model_checkpoint_paths: tuple[str, ...] = ()
    all_model_checkpoint_timestamps: tuple[float, ...] = ()
    last_preserved_timestamp: float = 0.0


def _quote(text: str) -> str:
    return '"' + text.translate(_ESCAPES) + '"'


def _double(value: float) -> str:
    # Python protobuf prints doubles with str(): the shortest repr that round-trips.
    return str(float(value))


def _is_positive_zero(value: float) -> bool:
    # proto3 leaves a scalar out when it holds the default; -0.0 differs in its bits.
    return value == 0.0 and math.copysign(1.0, value) > 0


def encode_state(state: CheckpointState) -> bytes:
    """The state file's bytes, as ``text_format.MessageToString`` prints them."""
    lines: list[str] = []
    if state.model_checkpoint_path:
        lines.append(f"model_checkpoint_path: {_quote(state.model_checkpoint_path)}")
    lines.extend(
        f"all_model_checkpoint_paths: {_quote(p)}" for p in state.all_model_checkpoint_paths
    )
    lines.extend(
        f"all_model_checkpoint_timestamps: {_double(t)}"
        for t in state.all_model_checkpoint_timestamps
    )
    if not _is_positive_zero(state.last_preserved_timestamp):
        lines.append(f"last_preserved_timestamp: {_double(state.last_preserved_timestamp)}")
    return "".join(line + "\n" for line in lines).encode("utf-8")


def decode_state(data: bytes | bytearray | memoryview) -> CheckpointState:
    """Parse a state file; anything that is not a usable CheckpointState is corrupt.

    Like TensorFlow's reader, a repeated singular field keeps its last value, and a file that
    names no ``model_checkpoint_path`` is invalid.
    """
    message = checkpoint_state_pb2.CheckpointState()
    try:
        text = bytes(data).decode("utf-8")
        text_format.Merge(text, message, allow_unknown_field=True)
    except (text_format.ParseError, ValueError, RecursionError) as exc:
        # ValueError covers UnicodeDecodeError and the parser's own value errors.
        raise CorruptCheckpointError(f"not a text-format CheckpointState: {exc}") from None
    if not message.model_checkpoint_path:
        raise CorruptCheckpointError("the checkpoint state names no model_checkpoint_path")
    return CheckpointState(
        model_checkpoint_path=message.model_checkpoint_path,
        all_model_checkpoint_paths=tuple(message.all_model_checkpoint_paths),
        all_model_checkpoint_timestamps=tuple(message.all_model_checkpoint_timestamps),
        last_preserved_timestamp=message.last_preserved_timestamp,
    )


def encode_metrics(
    metrics_by_path: Mapping[str, Mapping[str, float]],
    *,
    best: tuple[str, str, int] | None = None,
) -> bytes:
    """The sidecar's bytes: ``{"format": ..., "checkpoints": {path: {metric: value}}}``.

    Paths are spelled as in the state file. Non-finite values are written as JSON's common
    extension (``NaN``, ``Infinity``), which :func:`decode_metrics` reads back. ``best``
    (metric, "min" or "max", how many) is the manager's keep-best rule, written beside the
    metrics so that a reader (``streamckpt ls DIR``) can tell which checkpoints it keeps.
    """
    document: dict[str, Any] = {
        "format": METRICS_FORMAT,
        "checkpoints": {
            path: {name: float(value) for name, value in metrics.items()}
            for path, metrics in metrics_by_path.items()
        },
    }
    if best is not None:
        metric, mode, keep = best
        document["best"] = {"metric": metric, "mode": mode, "keep": keep}
    return (json.dumps(document, indent=1) + "\n").encode("utf-8")


def decode_metrics(data: bytes | bytearray | memoryview) -> dict[str, dict[str, float]]:
    """Parse a sidecar; anything but the shape :func:`encode_metrics` writes is corrupt."""
    try:
        document: Any = json.loads(bytes(data).decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"metrics sidecar is not JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != METRICS_FORMAT:
        raise CorruptCheckpointError(f"metrics sidecar is not in the {METRICS_FORMAT} format")
    checkpoints = document.get("checkpoints")
    if not isinstance(checkpoints, dict):
        raise CorruptCheckpointError("metrics sidecar has no 'checkpoints' object")
    result: dict[str, dict[str, float]] = {}
    for path, metrics in checkpoints.items():
        if not isinstance(metrics, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values()
        ):
            raise CorruptCheckpointError(f"metrics of {path!r} are not numbers by name")
        try:
            result[path] = {name: float(value) for name, value in metrics.items()}
        except OverflowError:  # an integer too large for a double
            raise CorruptCheckpointError(f"a metric of {path!r} is out of range") from None
    return result
