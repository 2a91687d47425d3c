"""Fuzzing the index and entry decoders at volume: whatever the bytes, only StreamCkptError,
no input slower than 0.1 s, and a bounded allocation peak.

Hypothesis picks a corpus file, a few structured mutations of it and a random entry value
(so that a failure shrinks to a small case), and a seed; each example then also decodes a
batch of further inputs derived from that seed, which is what makes 100,000 inputs fit in a
CI run. ``STREAMCKPT_FUZZ_INPUTS`` sets the number of inputs (default 100,000; the long mode
is ``STREAMCKPT_FUZZ_INPUTS=1000000``). A failing input is printed in hex.

Mutations that reseal a block (recompute its checksum after changing it) get past the
trailer check to the record, entry and header decoders; truncations, splices and bit flips
exercise the footer and the block framing.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support import TF_FIXTURES

from streamckpt.errors import StreamCkptError
from streamckpt.format.block import iter_block
from streamckpt.format.bundle import BundleEntry, BundleHeader, decode_entry
from streamckpt.format.dtypes import DataType
from streamckpt.format.index_file import decode_index
from streamckpt.format.slices import Extent, TensorSlice
from streamckpt.format.table import (
    FOOTER_SIZE,
    TRAILER_SIZE,
    decode_block,
    decode_footer,
    decode_index_block,
    encode_block_trailer,
)
from streamckpt.format.table_write import TableWriter

INPUTS = int(os.environ.get("STREAMCKPT_FUZZ_INPUTS", "100000"))
BATCH = 250  # inputs derived from each hypothesis example's seed
SLOW_SECONDS = 0.1
PEAK_BYTES = 16 << 20  # every input is a few KB; a decoder may not allocate past this


def _ours() -> bytes:
    """A two-shard bundle with 128-byte blocks (many blocks, a real index block), a
    partitioned tensor and a string tensor."""
    writer = TableWriter(block_size=128)
    writer.add(b"", BundleHeader(num_shards=2).encode())
    pieces = (TensorSlice((Extent(0, 2), Extent(0, None))), TensorSlice((Extent(2, 2),) * 2))
    writer.add(b"a/part", BundleEntry(DataType.DT_FLOAT, (4, 4), slices=pieces).encode())
    for i in range(12):
        entry = BundleEntry(
            DataType.DT_INT32, (i % 3,), shard_id=i % 2, offset=8 * i, size=4 * (i % 3)
        )
        writer.add(f"t/{i:03d}".encode(), entry.encode())
    writer.add(b"z/s", BundleEntry(DataType.DT_STRING, (3,), offset=96, size=12).encode())
    return writer.finish()


def _corpus() -> list[bytes]:
    found = [
        p.read_bytes() for p in sorted(TF_FIXTURES.glob("*/*.index")) if p.stat().st_size < 8 << 10
    ]
    return [*found, _ours()]


CORPUS = _corpus()


def _entry_values() -> list[bytes]:
    values = [bytes.fromhex("12021205")]
    for index in CORPUS:
        footer = decode_footer(index[-FOOTER_SIZE:], file_size=len(index))
        block = decode_block(index[footer.index.offset : footer.index.end_with_trailer], offset=0)
        handles = decode_index_block(block, index_offset=0, limit=len(index)).handles
        for h in handles:
            data = decode_block(index[h.offset : h.end_with_trailer], offset=h.offset)
            values += [bytes(value) for key, value in iter_block(data) if key]
    return values


ENTRY_VALUES = _entry_values()


def _block_spans(index: bytes) -> list[tuple[int, int]]:
    """(offset, size) of every block whose trailer a mutation may recompute."""
    footer = decode_footer(index[-FOOTER_SIZE:], file_size=len(index))
    block = decode_block(index[footer.index.offset : footer.index.end_with_trailer], offset=0)
    handles = decode_index_block(block, index_offset=0, limit=len(index)).handles
    return [(h.offset, h.size) for h in handles] + [(footer.index.offset, footer.index.size)]


SPANS = [_block_spans(index) for index in CORPUS]


def mutate(rng: random.Random, data: bytes, spans: list[tuple[int, int]] | None) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3))):
        kind = rng.randrange(8 if spans else 6)
        at = rng.randrange(len(out) + 1)
        if kind == 0 and out:
            out[min(at, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif kind == 1 and out:
            out[min(at, len(out) - 1)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif kind == 2:
            del out[at:]
        elif kind == 3:
            out[at:at] = rng.randbytes(rng.randrange(1, 9))
        elif kind == 4:
            del out[at : at + rng.randrange(1, 9)]
        elif kind == 5 and out:
            start = rng.randrange(len(out))
            out[at:at] = out[start : start + rng.randrange(1, 33)]
        elif spans:  # change bytes inside a block, then make its checksum right again
            offset, size = rng.choice(spans)
            if size and offset + size + TRAILER_SIZE <= len(out):
                for _ in range(rng.randrange(1, 4)):
                    out[offset + rng.randrange(size)] = rng.randrange(256)
                body = bytes(out[offset : offset + size])
                out[offset + size : offset + size + TRAILER_SIZE] = encode_block_trailer(
                    body, out[offset + size]
                )
    return bytes(out)


def seconds_of(decoder: Callable[[bytes], Any], data: bytes) -> float:
    started = time.perf_counter()
    try:
        decoder(data)
    except StreamCkptError:
        pass
    except Exception as exc:  # the finding: show the input
        raise AssertionError(f"{decoder.__name__}({data.hex()}) raised {exc!r}") from exc
    return time.perf_counter() - started


def check(decoder: Callable[[bytes], Any], data: bytes) -> None:
    if seconds_of(decoder, data) > SLOW_SECONDS:
        # A busy shared machine can stall a call for a while: the input is slow only if it
        # is slow every time, over half a second of tries.
        best = float("inf")
        for _ in range(5):
            time.sleep(0.1)
            best = min(best, seconds_of(decoder, data))
        assert best < SLOW_SECONDS, f"{decoder.__name__}({data.hex()}) took {best:.3f} s"


def decode_entry_checked(value: bytes) -> None:
    decode_entry(value, num_shards=2)


@contextlib.contextmanager
def allocation_peak_below(limit: int, *, traced: bool) -> Iterator[None]:
    """Trace allocations in the block (tracing slows decoding fourfold, so the fuzz traces
    one batch in four) and fail if their peak passes ``limit``."""
    if not traced:
        yield
        return
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < limit, f"the batch allocated {peak} bytes at its peak"


@pytest.mark.timeout(600)
@settings(
    max_examples=max(1, INPUTS // (BATCH + 2)),
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(
    which=st.integers(0, len(CORPUS) - 1),
    entry=st.binary(max_size=48) | st.sampled_from(ENTRY_VALUES),
    seed=st.integers(0, 2**32 - 1),
)
@example(which=0, entry=bytes.fromhex("12021205"), seed=0)  # a bare IndexError once
def test_decoders_raise_only_our_errors_fast_and_small(which: int, entry: bytes, seed: int) -> None:
    rng = random.Random(seed)
    with allocation_peak_below(PEAK_BYTES, traced=seed % 4 == 0):
        check(decode_entry_checked, entry)
        check(decode_index, mutate(rng, CORPUS[which], SPANS[which]))
        for _ in range(BATCH // 2):
            i = rng.randrange(len(CORPUS))
            check(decode_index, mutate(rng, CORPUS[i], SPANS[i]))
            check(decode_entry_checked, mutate(rng, rng.choice(ENTRY_VALUES), None))


def test_mutations_reach_the_deep_checks() -> None:
    """The fuzzer is only as good as its inputs: enough of them pass the checksums and get
    decoded to entries (or refused by the entry and header checks)."""
    rng = random.Random(7)
    decoded = refused_deep = 0
    for _ in range(2000):
        i = rng.randrange(len(CORPUS))
        try:
            decode_index(mutate(rng, CORPUS[i], SPANS[i]))
            decoded += 1
        except StreamCkptError as exc:
            refused_deep += "checksum" not in str(exc) and "magic" not in str(exc)
    assert decoded > 50 and refused_deep > 300, (decoded, refused_deep)
