"""A save whose payloads are all in memory checksums them beside the writes, not on the way.

The batched path (``_stream_shard(tensor_crcs=False)``, ``payload_crcs``, the index encoded
while the shards stream) must write exactly what the checksum-as-you-go path writes: the same
shard bytes, the same shard crc32c, the same index bytes. One shard's plan is name order, as
``plan_save`` gives it.
"""

from __future__ import annotations

from typing import Any

import anyio
import anyio.to_thread
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from streamckpt.format.crc import crc32c
from streamckpt.pipeline import save
from streamckpt.pipeline.plan import plan_save
from streamckpt.pipeline.tensors import PreparedTensor
from streamckpt.storage.base import ShardWriter


class _Collect(ShardWriter):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, chunk: memoryview) -> None:
        self.chunks.append(bytes(chunk))

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


def _stream(
    prepared: dict[bytes, PreparedTensor], plan: Any, chunk_bytes: int, *, tensor_crcs: bool
) -> tuple[list[save.ShardResult], list[bytes]]:
    writers = [_Collect() for _ in range(plan.num_shards)]

    async def run() -> list[save.ShardResult]:
        return [
            await anyio.to_thread.run_sync(
                lambda i=i: save._stream_shard(
                    writers[i],
                    plan.shards[i],
                    prepared,
                    chunk_bytes,
                    True,
                    None,
                    tensor_crcs,
                )
            )
            for i in range(plan.num_shards)
        ]

    results = anyio.run(run)
    return results, [b"".join(w.chunks) for w in writers]


@settings(max_examples=120, deadline=None)
@given(
    tensors=_TENSORS,
    num_shards=st.integers(1, 3),
    chunk_bytes=st.sampled_from([64, 1000, 4096, 1 << 20]),
)
def test_batched_path_writes_what_the_streamed_path_writes(
    tensors: dict[str, Any], num_shards: int, chunk_bytes: int
) -> None:
    prepared = anyio.run(lambda: save.prepare_all(tensors, copy=False))
    plan = plan_save(sizes={k: t.size for k, t in prepared.items()}, num_shards=num_shards)
    streamed, streamed_bytes = _stream(prepared, plan, chunk_bytes, tensor_crcs=True)
    batched, batched_bytes = _stream(prepared, plan, chunk_bytes, tensor_crcs=False)

    assert batched_bytes == streamed_bytes
    assert [(r.size, r.shard_crc) for r in batched] == [(r.size, r.shard_crc) for r in streamed]
    assert [r.shard_crc for r in batched] == [crc32c(b) for b in batched_bytes]
    assert all(not r.tensor_crcs for r in batched)

    crcs = {key: crc for result in streamed for key, crc in result.tensor_crcs.items()}
    keys = sorted(prepared)
    assert save.payload_crcs([prepared[k] for k in keys]).tolist() == [crcs[k] for k in keys]
    assert save._encode_index(prepared, plan, None) == save._encode_index(prepared, plan, crcs)


@settings(max_examples=200, deadline=None)
@given(sizes=st.dictionaries(st.binary(min_size=1, max_size=4), st.integers(0, 1 << 30)))
def test_one_shard_plan_is_plan_saves(sizes: dict[bytes, int]) -> None:
    assert save._plan(sizes, 1, None) == plan_save(sizes=sizes, num_shards=1)
    assert save._plan(sizes, None, None) == plan_save(sizes=sizes, num_shards=1)
    assert save._plan(sizes, 3, None) == plan_save(sizes=sizes, num_shards=3)
