"""``streamckpt convert``: each result loaded by the library that owns its format."""

from __future__ import annotations

import json
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import streamckpt.sync
from streamckpt.cli import main

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, np.ndarray]]:
    values = {
        "layer/kernel": (np.arange(12, dtype=np.float32).reshape(3, 4) / 7).astype(
            ml_dtypes.bfloat16
        ),
        "layer/bias": np.arange(4, dtype=np.float16),
        "count": np.arange(3, dtype=np.int64),
        "scale": np.float32(2.5),
    }
    prefix = str(tmp_path_factory.mktemp("convert") / "ckpt-1")
    streamckpt.sync.save(prefix, values)
    return prefix, values


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _torch_to_numpy(tensor: object) -> np.ndarray:
    t = tensor.contiguous()  # type: ignore[attr-defined]
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def test_tf_to_safetensors_torch_hf_and_back(
    weights: tuple[str, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    prefix, values = weights
    single = tmp_path / "model.safetensors"
    assert main(["convert", prefix, str(single), "-q"]) == 0
    loaded = {k: _torch_to_numpy(v) for k, v in safetensors_torch.load_file(single).items()}
    assert loaded.keys() == values.keys()
    assert all(_same(loaded[k], np.asarray(values[k])) for k in values)

    state_dict = tmp_path / "model.pt"
    assert main(["convert", str(single), str(state_dict), "-q"]) == 0
    loaded = {k: _torch_to_numpy(v) for k, v in torch.load(state_dict, weights_only=True).items()}
    assert all(_same(loaded[k], np.asarray(values[k])) for k in values)

    hf = tmp_path / "hf"
    assert main(["convert", str(state_dict), f"{hf}/", "--max-shard-mib", "1", "-q"]) == 0
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(values)
    for name in set(index["weight_map"].values()):
        assert (hf / name).exists() and re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name)
        safetensors_torch.load_file(hf / name)

    back = str(tmp_path / "back")
    assert main(["convert", str(hf), back, "-q", "--budget-mib", "1"]) == 0
    restored = streamckpt.sync.load(back)
    assert all(_same(restored[k], np.asarray(values[k])) for k in values)


def test_name_map_renames_and_drops(
    weights: tuple[str, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    prefix, _ = weights
    name_map = tmp_path / "names.json"
    name_map.write_text(json.dumps({"layer/kernel": "w", "count": None}))
    out = tmp_path / "renamed.safetensors"
    assert main(["convert", prefix, str(out), "--name-map", str(name_map), "-q"]) == 0
    assert set(safetensors_torch.load_file(out)) == {"w", "layer/bias", "scale"}


def test_huggingface_written_directory_converts(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    first = {"a": torch.ones(2, 3, dtype=torch.bfloat16)}
    second = {"b": torch.arange(5, dtype=torch.int32)}
    safetensors_torch.save_file(first, hf / "model-00001-of-00002.safetensors")
    safetensors_torch.save_file(second, hf / "model-00002-of-00002.safetensors")
    (hf / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "metadata": {"total_size": 32},
                "weight_map": {
                    "a": "model-00001-of-00002.safetensors",
                    "b": "model-00002-of-00002.safetensors",
                },
            }
        )
    )
    prefix = str(tmp_path / "ckpt")
    assert main(["convert", str(hf), prefix, "-q"]) == 0
    restored = streamckpt.sync.load(prefix)
    assert restored["a"].dtype == ml_dtypes.bfloat16 and restored["a"].shape == (2, 3)
    assert restored["b"].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.tf
def test_tensorflow_reads_a_converted_checkpoint(tmp_path: Path) -> None:
    tf = pytest.importorskip("tensorflow")
    source = tmp_path / "m.pt"
    torch.save({"dense.weight": torch.full((2, 2), 1.5, dtype=torch.bfloat16)}, source)
    prefix = str(tmp_path / "ckpt")
    assert main(["convert", str(source), prefix, "-q"]) == 0
    reader = tf.train.load_checkpoint(prefix)
    value = reader.get_tensor("dense.weight")
    assert (
        value.dtype == ml_dtypes.bfloat16 and value.astype(np.float32).tolist() == [[1.5] * 2] * 2
    )
