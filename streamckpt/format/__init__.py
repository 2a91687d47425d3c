"""The TensorFlow v2 checkpoint format, pure: bytes in, values out, and back. No I/O here.

This package never imports anyio or fsspec (a test checks it). Every check against corrupt or
hostile input lives here and raises :class:`streamckpt.errors.CorruptCheckpointError` (or a
subclass); sizes that a header claims are checked against real byte counts before anything is
allocated.
"""
