"""Framework tensors as leaves: torch bfloat16 / float8 saved bit for bit, restored in place."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import streamckpt
import streamckpt.sync as sc
from streamckpt.errors import StreamCkptError

torch = pytest.importorskip("torch")

KEY = "{}/.ATTRIBUTES/VARIABLE_VALUE"


@pytest.mark.parametrize(
    ("torch_dtype", "numpy_dtype"),
    [
        ("bfloat16", ml_dtypes.bfloat16),
        ("float8_e4m3fn", ml_dtypes.float8_e4m3fn),
        ("float8_e5m2", ml_dtypes.float8_e5m2),
        ("float32", np.float32),
    ],
)
def test_torch_leaves_of_every_dtype_save_bit_exact(
    tmp_path: Path, torch_dtype: str, numpy_dtype: type
) -> None:
    values = torch.linspace(-3, 3, 12).reshape(3, 4).to(getattr(torch, torch_dtype))
    sc.save(tmp_path / "a", {"w": values})
    loaded = sc.load(tmp_path / "a")["w"]
    assert loaded.dtype == np.dtype(numpy_dtype)
    bits = values.view(torch.int16 if values.element_size() == 2 else torch.uint8)
    if values.element_size() == 4:
        bits = values.view(torch.int32)
    assert loaded.view(bits.numpy().dtype).tolist() == bits.numpy().tolist()


def test_parameters_with_grad_save_and_restore_in_place(tmp_path: Path) -> None:
    layer = torch.nn.Linear(4, 3).to(torch.bfloat16)
    model = {"weight": layer.weight, "bias": layer.bias}
    expected = {k: v.detach().clone() for k, v in model.items()}
    ckpt = sc.Checkpoint(model=model)
    path = ckpt.save(tmp_path / "c")
    weight_before = layer.weight
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.fill_(7)
    target = sc.Checkpoint(model={"weight": layer.weight, "bias": layer.bias})
    target.restore(path).assert_consumed()
    assert layer.weight is weight_before and layer.weight.requires_grad  # filled in place
    assert torch.equal(layer.weight, expected["weight"])
    assert torch.equal(layer.bias, expected["bias"])
    assert layer.weight.dtype == torch.bfloat16


@pytest.mark.anyio
async def test_background_save_snapshots_torch_bfloat16(tmp_path: Path) -> None:
    weights = torch.arange(6, dtype=torch.bfloat16)
    async with streamckpt.Checkpoint(t=weights) as ckpt:
        handle = ckpt.save_async(tmp_path / "c")
        weights.mul_(0)  # after the snapshot: must not reach the checkpoint
        path = await handle
    loaded = await streamckpt.load(path)
    assert loaded[KEY.format("t")].astype(np.float32).tolist() == [0, 1, 2, 3, 4, 5]


def test_a_value_that_cannot_be_saved_names_its_tensor(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="ComplexHalf"):
        bad = torch.ones(2, dtype=torch.complex32)
    with pytest.raises(StreamCkptError) as caught:
        sc.save(tmp_path / "b", {"good": np.ones(2), "bad": bad})
    assert caught.value.tensor == "bad"
    with pytest.raises(StreamCkptError) as caught:
        sc.Checkpoint(m={"bad": bad}).save(tmp_path / "c", blocking=False)
    assert caught.value.tensor == KEY.format("m/bad")
