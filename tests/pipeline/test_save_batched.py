"""A shard streams its payloads' views in batches, checksumming each payload on the way.

``shard_stream.stream_shard`` hands the writer batches of views (``write_many``) instead of
copying small payloads into a buffer of its own: what lands must be exactly the payloads in
plan order, each batch within one chunk and ``BATCH_VIEWS`` views, a payload larger than a
chunk in chunk-sized slices alone, and the tensor and shard checksums those of the bytes.
One shard's plan is name order, as ``plan_save`` gives it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import anyio.to_thread
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamckpt.format.crc import crc32c, mask
from streamckpt.pipeline import save, shard_stream
from streamckpt.pipeline.plan import plan_save
from streamckpt.storage.base import ShardWriter


class _Collect(ShardWriter):
    """Records each ``write_many`` batch as the byte strings it held."""

    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []

    def write(self, chunk: memoryview) -> None:
        self.write_many([chunk])

    def write_many(self, chunks: Sequence[memoryview]) -> None:
        self.batches.append([bytes(c) for c in chunks])

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass


_VALUES = st.one_of(
    st.integers(0, 3000).map(lambda n: np.arange(n, dtype=np.float32)),
    st.integers(0, 40).map(lambda n: np.arange(n, dtype=np.int8).reshape(n, 1)),
    st.lists(st.binary(max_size=20), max_size=4).map(lambda xs: np.array(xs, dtype=object)),
    st.just(np.float64(2.5)),
)
_TENSORS = st.dictionaries(st.text(min_size=1, max_size=6), _VALUES, min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(
    tensors=_TENSORS,
    num_shards=st.integers(1, 3),
    chunk_bytes=st.sampled_from([64, 1000, 4096, 1 << 20]),
    batch_views=st.sampled_from([1, 3, 1024]),
    tensor_crcs=st.booleans(),
)
def test_a_shard_streams_its_payloads_in_bounded_batches(
    tensors: dict[str, Any], num_shards: int, chunk_bytes: int, batch_views: int, tensor_crcs: bool
) -> None:
    prepared = anyio.run(lambda: save.prepare_all(tensors, copy=False))
    plan = plan_save(sizes={k: t.size for k, t in prepared.items()}, num_shards=num_shards)
    writers = [_Collect() for _ in range(plan.num_shards)]

    async def run() -> list[shard_stream.ShardResult]:
        return [
            await anyio.to_thread.run_sync(
                lambda i=i: shard_stream.stream_shard(
                    writers[i], plan.shards[i], prepared, chunk_bytes, True, None, tensor_crcs
                )
            )
            for i in range(plan.num_shards)
        ]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shard_stream, "BATCH_VIEWS", batch_views)
        results = anyio.run(run)
    for shard, writer, result in zip(plan.shards, writers, results, strict=True):
        payloads = [bytes(prepared[p.key].payload) for p in shard]
        written = b"".join(b"".join(batch) for batch in writer.batches)
        assert written == b"".join(payloads)
        assert result.size == len(written) and result.shard_crc == crc32c(written)
        expected = {  # a string tensor's is TensorFlow's, made with it
            p.key: mask(crc32c(payload)) if (known := prepared[p.key].crc32c) is None else known
            for p, payload in zip(shard, payloads, strict=True)
        }
        # without: the encoder checksums payloads in memory itself, to the same values
        assert result.tensor_crcs == (expected if tensor_crcs else {})
        tensors_in_order = [prepared[p.key] for p in shard]
        assert save.payload_crcs(tensors_in_order).tolist() == list(expected.values())
        for batch in writer.batches:
            assert batch and len(batch) <= batch_views
            assert sum(map(len, batch)) <= chunk_bytes
        big = [p for p in payloads if len(p) > chunk_bytes]
        alone = [b"".join(batch) for batch in writer.batches if len(batch) == 1]
        for payload in big:  # in chunk-sized slices, each a batch of its own
            slices = [payload[i : i + chunk_bytes] for i in range(0, len(payload), chunk_bytes)]
            assert all(piece in alone for piece in slices)


@settings(max_examples=200, deadline=None)
@given(sizes=st.dictionaries(st.binary(min_size=1, max_size=4), st.integers(0, 1 << 30)))
def test_one_shard_plan_is_plan_saves(sizes: dict[bytes, int]) -> None:
    assert save._plan(sizes, 1, None) == plan_save(sizes=sizes, num_shards=1)
    assert save._plan(sizes, None, None) == plan_save(sizes=sizes, num_shards=1)
    assert save._plan(sizes, 3, None) == plan_save(sizes=sizes, num_shards=3)
