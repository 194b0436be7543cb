"""Export: the integer safetensors round trip on the real ResNet-20, and the format registry (ONNX: test_onnx.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import needs_shared
from sadag.export import ExportFormatError, load_quantized, save_quantized
from sadag.models import load_model

pytestmark = needs_shared
NAME = "resnet20_cifar10"


@pytest.fixture(scope="module")
def w4a4(r20_w4a4):
    return r20_w4a4


@pytest.fixture(scope="module")
def spec(r20_spec):
    return r20_spec


@pytest.fixture(scope="module")
def test_slice(cifar_test_slice):
    return cifar_test_slice


@pytest.fixture(scope="module")
def w4a4_file(w4a4, spec, tmp_path_factory) -> Path:
    qmodel, cfg = w4a4
    path = tmp_path_factory.mktemp("export") / "r20_w4a4.safetensors"
    return save_quantized(qmodel, path, model_name=NAME, spec=spec, quant_config=cfg, extra={"note": "test"})


def test_safetensors_holds_integers_and_metadata(w4a4, w4a4_file) -> None:
    qmodel, _ = w4a4
    tensors = load_file(str(w4a4_file))
    q = tensors["w.layer1.0.conv1.q"]
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and tensors["w.linear.q"].dtype == torch.uint8
    assert tensors["w.layer1.0.conv1.scale"].dtype == torch.float32 and tensors["w.layer1.0.conv1.scale"].shape == (16,)
    assert "fp.layer1.0.bn1.running_var" in tensors and "a.layer1.0.sadag_input_quantizer.scale" in tensors
    assert not any(k.endswith(".alpha") or k.endswith(".w_floor") for k in tensors)
    from safetensors import safe_open

    with safe_open(str(w4a4_file), framework="pt") as f:
        meta = json.loads(f.metadata()["sadag"])
    assert meta["model_name"] == NAME and meta["w_bits"] == 4 and meta["a_bits"] == 4
    assert meta["spec"]["input_size"] == 32 and meta["extra"] == {"note": "test"}
    assert meta["plan"]["block_inputs"] == qmodel.sadag_plan.to_dict()["block_inputs"]
    assert meta["act_quantizers"]["layer1.1.sadag_input_quantizer"]["bits"] == 4


def test_safetensors_reload_is_exact(w4a4, w4a4_file, test_slice) -> None:
    qmodel, _ = w4a4
    images, _ = test_slice
    reloaded, meta = load_quantized(w4a4_file)
    with torch.no_grad():
        ours, theirs = qmodel(images), reloaded(images)
    diff = float((ours - theirs).abs().max())
    print(f"\nsafetensors reload: max abs logit diff {diff:.3g} on {len(images)} images")
    assert diff < 1e-5
    assert torch.equal(ours.argmax(1), theirs.argmax(1))
    assert meta["quant_config"]["w_bits"] == 4


def test_safetensors_reload_into_given_module(w4a4_file, test_slice, w4a4) -> None:
    fp, _ = load_model(NAME, pretrained=False)
    reloaded, _ = load_quantized(w4a4_file, model=fp)
    with torch.no_grad():
        assert torch.allclose(reloaded(test_slice[0][:16]), w4a4[0](test_slice[0][:16]), atol=1e-5, rtol=0)


def test_not_a_sadag_file(tmp_path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(ExportFormatError, match="not a readable"):
        load_quantized(junk)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(ExportFormatError, match="not a sadag export"):
        load_quantized(plain)
    with pytest.raises(ExportFormatError, match="does not exist"):
        load_quantized(tmp_path / "missing.safetensors")


def test_tensors_that_do_not_fit(w4a4_file, tmp_path) -> None:
    from safetensors import safe_open

    with safe_open(str(w4a4_file), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(w4a4_file))
    tensors["w.layer1.0.conv1.q"] = tensors["w.layer1.0.conv1.q"][:8].contiguous()
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    with pytest.raises(ExportFormatError, match="layer1.0.conv1"):
        load_quantized(bad)
