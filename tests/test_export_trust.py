"""Export files are data: a tampered quantized.safetensors is refused, never imports code, never over-allocates."""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import TinyNet, randomize_bn_, tiny_bn_model
from sadag.config import QuantConfig
from sadag.errors import ConfigError
from sadag.export import ExportFormatError, export_model, load_quantized, save_quantized
from sadag.quantization.prepare import quantize, set_quant_state_
from sadag.quantization.quantizers import ActQuantizer

FACTORY = "conftest:tiny_bn_model"


def _calibrated(w_bits: int, a_bits: int, model: torch.nn.Module | None = None,
                fold_bn: bool = False) -> tuple[torch.nn.Module, QuantConfig]:
    """TinyNet (or ``model``) quantized with round-to-nearest weights and activation ranges observed on one batch."""
    model = model if model is not None else tiny_bn_model()[0]
    cfg = QuantConfig(w_bits=w_bits, a_bits=a_bits, fold_bn=fold_bn)
    qmodel = quantize(model, cfg, torch.zeros(1, 3, 16, 16))
    acts = [m for m in qmodel.modules() if isinstance(m, ActQuantizer)]
    for act in acts:
        act.observing = True
    with torch.no_grad():
        qmodel(torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    for act in acts:
        act.observing = False
    return qmodel, cfg


def _export(path: Path, w_bits: int = 4, a_bits: int = 4) -> Path:
    qmodel, cfg = _calibrated(w_bits, a_bits)
    return save_quantized(qmodel, path, model_name=FACTORY, spec=tiny_bn_model()[1], quant_config=cfg)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("exports")
    _export(folder / "w4a4.safetensors")
    _export(folder / "w8a4.safetensors", w_bits=8)
    return folder


def _meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["sadag"])


def _tamper(src: Path, dst: Path, tensors: Callable[[dict], None] | None = None,
            meta: Callable[[dict], None] | None = None) -> Path:
    """A copy of ``src`` with its tensors and/or its sadag metadata edited in place by the callbacks."""
    data, info = load_file(str(src)), _meta(src)
    if tensors:
        tensors(data)
    if meta:
        meta(info)
    save_file(data, str(dst), metadata={"sadag": json.dumps(info)})
    return dst


def _four_bit_layer(path: Path) -> str:
    return next(n for n, info in _meta(path)["layers"].items() if info["bits"] == 4)


def _load(path: Path) -> tuple[torch.nn.Module, dict]:
    return load_quantized(path, model=TinyNet())


def test_untampered_exports_load_at_every_width(export_dir: Path, tmp_path: Path) -> None:
    x = torch.randn(2, 3, 16, 16)
    for w_bits, a_bits in [(4, 4), (8, 4), (2, 4), (3, 3)]:
        qmodel, _ = _calibrated(w_bits, a_bits)
        path = _export(tmp_path / f"w{w_bits}a{a_bits}.safetensors", w_bits, a_bits)
        reloaded, meta = _load(path)
        with torch.no_grad():
            assert torch.allclose(reloaded(x), qmodel(x), atol=1e-5, rtol=0), (w_bits, a_bits)
        assert meta["w_bits"] == w_bits


def test_module_factory_name_needs_the_model_or_allow_import(export_dir: Path) -> None:
    path = export_dir / "w4a4.safetensors"
    with pytest.raises(ExportFormatError, match=r"'conftest:tiny_bn_model', a Python module:function.*"
                                                r"model=.*allow_import=True \(--allow-import\)"):
        load_quantized(path)
    imported, _ = load_quantized(path, allow_import=True)
    given, _ = load_quantized(path, model=TinyNet())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(imported(x), given(x))


def test_tampered_model_name_imports_and_calls_nothing(export_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def called(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("tempfile.mkdtemp was called")

    monkeypatch.setattr(tempfile, "mkdtemp", called)
    marker = tmp_path / "imported"
    (tmp_path / "sadag_helpers.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\ndef build():\n    pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    src = export_dir / "w4a4.safetensors"
    for name in ["tempfile:mkdtemp", "sadag_helpers:build"]:
        bad = _tamper(src, tmp_path / "bad.safetensors", meta=lambda m, n=name: m.update(model_name=n))
        with pytest.raises(ExportFormatError, match=f"'{name}', a Python module:function"):
            load_quantized(bad)
    bad = _tamper(src, tmp_path / "bad.safetensors", meta=lambda m: m.update(model_name="sadag_helpers"))
    with pytest.raises(ExportFormatError, match="'sadag_helpers', which is not in sadag's model zoo"):
        load_quantized(bad)
    assert not marker.exists() and "sadag_helpers" not in sys.modules


def test_reshaped_tensor_with_same_element_count_is_refused(export_dir: Path, tmp_path: Path) -> None:
    src = export_dir / "w4a4.safetensors"
    key = f"w.{_four_bit_layer(src)}.q"

    def reshape(t: dict) -> None:
        t[key] = t[key].reshape(t[key].shape[0] * t[key].shape[1], -1).contiguous()

    with pytest.raises(ExportFormatError, match=f"'{key}' is torch.uint8 .*the model needs torch.uint8"):
        _load(_tamper(src, tmp_path / "bad.safetensors", tensors=reshape))


def test_wrong_dtype_and_out_of_grid_integers_are_refused(export_dir: Path, tmp_path: Path) -> None:
    src = export_dir / "w4a4.safetensors"
    layer = _four_bit_layer(src)
    as_float = _tamper(src, tmp_path / "f.safetensors", tensors=lambda t: t.update(
        {f"w.{layer}.q": t[f"w.{layer}.q"].float()}))
    with pytest.raises(ExportFormatError, match=f"'w.{layer}.q' is torch.float32"):
        _load(as_float)

    def big_zero_point(t: dict) -> None:
        t[f"w.{layer}.zero_point"][0] = 200

    with pytest.raises(ExportFormatError, match=f"'w.{layer}.zero_point' holds values up to 200, above qmax=15"):
        _load(_tamper(src, tmp_path / "zp.safetensors", tensors=big_zero_point))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -0.5])
def test_bad_scales_are_refused(export_dir: Path, tmp_path: Path, value: float) -> None:
    src = export_dir / "w4a4.safetensors"
    layer = _four_bit_layer(src)
    act = next(k for k in load_file(str(src)) if k.startswith("a.") and k.endswith(".scale"))

    def weight_scale(t: dict) -> None:
        t[f"w.{layer}.scale"][1] = value

    weights = _tamper(src, tmp_path / "w.safetensors", tensors=weight_scale)
    if value < 0:  # reconstruction can learn a negative weight step size; the layer stays exact
        _load(weights)
    else:
        with pytest.raises(ExportFormatError, match=f"'w.{layer}.scale' holds step sizes that are not finite "
                                                    f"and non-zero"):
            _load(weights)
    with pytest.raises(ExportFormatError, match=f"'{act}' holds step sizes that are not finite and positive"):
        _load(_tamper(src, tmp_path / "a.safetensors", tensors=lambda t: t.update({act: torch.tensor(value)})))


def test_non_finite_fp_tensor_is_refused(export_dir: Path, tmp_path: Path) -> None:
    src = export_dir / "w4a4.safetensors"

    def nan_var(t: dict) -> None:
        t["fp.stem.1.running_var"][2] = float("nan")

    with pytest.raises(ExportFormatError, match=r"'fp.stem.1.running_var' holds NaN"):
        _load(_tamper(src, tmp_path / "bad.safetensors", tensors=nan_var))


def test_four_bit_layers_relabelled_eight_bit_are_refused(export_dir: Path, tmp_path: Path) -> None:
    # The W4A4 tensors under the W8A4 file's metadata: every declared field is consistent, only the
    # integers betray that the middle layers use 16 levels of their 256.
    w4, w8 = export_dir / "w4a4.safetensors", export_dir / "w8a4.safetensors"
    eight = _meta(w8)
    relabelled = _tamper(w4, tmp_path / "relabelled.safetensors", meta=lambda m: m.update(eight))
    with pytest.raises(ExportFormatError, match=f"layer {_four_bit_layer(w4)} is declared 8-bit but its integer "
                                                f"weights span only 1[0-6] levels, which fit in 7 bits"):
        _load(relabelled)


def test_huge_input_size_is_refused_before_allocating(export_dir: Path, tmp_path: Path) -> None:
    src = export_dir / "w4a4.safetensors"
    bad = _tamper(src, tmp_path / "bad.safetensors", meta=lambda m: m["spec"].update(input_size=40000))
    with pytest.raises(ExportFormatError, match=r"input_size=40000.*must be in 1\.\.2048") as e:
        _load(bad)
    assert "--resume" not in str(e.value)
    for field, value in [("std", [0.25, 0.0, 0.25]), ("num_classes", -3), ("mean", ["a", 0, 0])]:
        bad = _tamper(src, tmp_path / "bad.safetensors", meta=lambda m, f=field, v=value: m["spec"].update({f: v}))
        with pytest.raises(ExportFormatError, match=f"{field}="):
            _load(bad)


def test_spec_must_match_the_registered_model(export_dir: Path, tmp_path: Path) -> None:
    bad = _tamper(export_dir / "w4a4.safetensors", tmp_path / "bad.safetensors",
                  meta=lambda m: m.update(model_name="resnet20_cifar10"))
    with pytest.raises(ExportFormatError, match="16x16 inputs and 10 classes, the model 32x32 and 10"):
        load_quantized(bad)


def test_metadata_bits_and_extra_tensors_are_checked(export_dir: Path, tmp_path: Path) -> None:
    src = export_dir / "w4a4.safetensors"
    bad = _tamper(src, tmp_path / "bits.safetensors", meta=lambda m: m.update(w_bits=2))
    with pytest.raises(ExportFormatError, match="bits W2A4 differ from its quant_config W4A4"):
        _load(bad)
    bad = _tamper(src, tmp_path / "qc.safetensors", meta=lambda m: m["quant_config"].update(clip_search_p="x"))
    with pytest.raises(ExportFormatError, match="malformed quant_config"):
        _load(bad)
    bad = _tamper(src, tmp_path / "extra.safetensors", tensors=lambda t: t.update({"w.ghost.q": torch.zeros(2)}))
    with pytest.raises(ExportFormatError, match=r"tensors the model does not have: \['w.ghost.q'\]"):
        _load(bad)


def test_export_to_unwritable_places_is_a_clear_error(tmp_path: Path) -> None:
    qmodel, cfg = _calibrated(4, 4)
    spec = tiny_bn_model()[1]
    (tmp_path / "a_file").write_text("x")
    targets = {tmp_path: "is a directory", tmp_path / "a_file" / "q.safetensors": "cannot write the export"}
    if Path("/proc/self").is_dir():  # unwritable even for root
        targets[Path("/proc/q.safetensors")] = "cannot write the export"
    for target, match in targets.items():
        with pytest.raises(ExportFormatError, match=match):
            save_quantized(qmodel, target, model_name=FACTORY, spec=spec, quant_config=cfg)
        onnx_target = target if target.is_dir() else target.with_suffix(".onnx")
        with pytest.raises(ExportFormatError, match=match):  # every format, checked before any export work
            export_model(qmodel, onnx_target, "onnx", spec=spec)
    assert (tmp_path / "a_file").read_text() == "x"


def test_a_model_with_non_finite_scales_is_never_written(tmp_path: Path) -> None:
    from sadag.errors import NumericalError

    qmodel, cfg = _calibrated(4, 4)
    act = next(m for m in qmodel.modules() if isinstance(m, ActQuantizer) and m.bits is not None and m.ready)
    with torch.no_grad():
        act.scale.fill_(float("nan"))
    with pytest.raises(NumericalError, match=r"cannot export: a\..* hold NaN or infinite values"):
        save_quantized(qmodel, tmp_path / "q.safetensors", model_name=FACTORY, spec=tiny_bn_model()[1],
                       quant_config=cfg)
    assert not any(tmp_path.iterdir())


def test_switched_off_quantization_is_neither_written_nor_read(export_dir: Path, tmp_path: Path) -> None:
    qmodel, cfg = _calibrated(4, 4)
    set_quant_state_(qmodel, weights=True, acts=False)  # a W4A4-labelled file would run FP activations
    with pytest.raises(ConfigError, match="quantization is switched off in .*switch it on"):
        save_quantized(qmodel, tmp_path / "off.safetensors", model_name=FACTORY, spec=tiny_bn_model()[1],
                       quant_config=cfg)
    assert not (tmp_path / "off.safetensors").exists()
    src = export_dir / "w4a4.safetensors"
    act = next(n for n, info in _meta(src)["act_quantizers"].items() if info["bits"] == 4)
    bad = _tamper(src, tmp_path / "bad.safetensors", meta=lambda m: m["act_quantizers"][act].update(active=False))
    with pytest.raises(ExportFormatError, match=f"activation quantizer {act} is declared 4-bit and switched off"):
        _load(bad)
    layer = _four_bit_layer(src)
    bad = _tamper(src, tmp_path / "bad.safetensors", meta=lambda m: m["layers"][layer].update(quantize_weight=False))
    with pytest.raises(ExportFormatError, match=f"layer {layer} is declared 4-bit with its quantization switched"):
        _load(bad)


def test_uncalibrated_quantizers_are_neither_written_nor_read(export_dir: Path, tmp_path: Path) -> None:
    # straight from quantize(): a W4A4-labelled file (or ONNX graph) would run its activations in full precision
    model, spec = tiny_bn_model()
    cfg = QuantConfig(w_bits=4, a_bits=4)
    qmodel = quantize(model, cfg, torch.zeros(1, 3, 16, 16))
    never = r"activation quantizers .*block.conv2.input_quantizer.* were never calibrated .*calibrate the model first"
    with pytest.raises(ConfigError, match=never):
        save_quantized(qmodel, tmp_path / "raw.safetensors", model_name=FACTORY, spec=spec, quant_config=cfg)
    if importlib.util.find_spec("onnx") is not None:
        with pytest.raises(ConfigError, match=never):
            export_model(qmodel, tmp_path / "raw.onnx", "onnx", spec=spec)
    assert not any(tmp_path.iterdir())
    src = export_dir / "w4a4.safetensors"
    act = next(n for n, info in _meta(src)["act_quantizers"].items() if info["bits"] == 4)
    for value in [False, "yes"]:
        bad = _tamper(src, tmp_path / "bad.safetensors",
                      tensors=lambda t: [t.pop(f"a.{act}.{part}") for part in ("scale", "zero_point")],
                      meta=lambda m, v=value: m["act_quantizers"][act].update(initialized=v))
        with pytest.raises(ExportFormatError, match=f"activation quantizer {act} is declared 4-bit but not "
                                                    f"initialized"):
            _load(bad)


class WithUnusedLayer(TinyNet):
    """TinyNet holding a layer its forward never calls (an auxiliary head, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = torch.nn.Linear(16, 3)


def test_a_layer_the_forward_never_calls_stays_uncalibrated_and_exports(tmp_path: Path) -> None:
    qmodel, cfg = _calibrated(4, 4, model=WithUnusedLayer())
    assert not qmodel.aux.input_quantizer.ready  # calibration never reaches it, and no export runs it
    path = save_quantized(qmodel, tmp_path / "q.safetensors", model_name="mymodels:aux", spec=tiny_bn_model()[1],
                          quant_config=cfg)
    reloaded, meta = load_quantized(path, model=WithUnusedLayer())
    assert meta["act_quantizers"]["aux.input_quantizer"] == {"bits": 4, "active": True, "initialized": False}
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(reloaded(x), qmodel(x))


class InplaceReluBeforeBN(torch.nn.Module):
    """conv1 -> in-place ReLU -> bn1: the trace sees a direct pair, fold_bn_'s output test refuses the fold with
    trained statistics and accepts it with fresh ones (near-identity BN), so a rebuilt model decides otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
        self.conv2, self.bn2 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(torch.nn.functional.relu(self.conv1(x), inplace=True))
        y = torch.nn.functional.relu(self.bn2(self.conv2(y)))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("make,folded", [(TinyNet, [["stem.0", "stem.1"], ["block.conv1", "block.bn1"],
                                                    ["block.conv2", "block.bn2"], ["head.0", "head.1"]]),
                                         (InplaceReluBeforeBN, [["conv2", "bn2"]])])
def test_fold_bn_exports_reload_with_the_exported_folds(tmp_path: Path, make: type, folded: list) -> None:
    torch.manual_seed(0)
    qmodel, cfg = _calibrated(4, 4, model=randomize_bn_(make()), fold_bn=True)
    path = save_quantized(qmodel, tmp_path / "q.safetensors", model_name="mymodels:m", spec=tiny_bn_model()[1],
                          quant_config=cfg)
    assert _meta(path)["plan"]["folded"] == folded
    reloaded, _ = load_quantized(path, model=make())  # fresh weights: its own fold test would decide otherwise
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(reloaded(x), qmodel(x), atol=1e-5, rtol=0)


def test_folded_pairs_and_plan_fields_are_checked(tmp_path: Path) -> None:
    qmodel, cfg = _calibrated(4, 4, model=tiny_bn_model()[0], fold_bn=True)
    src = save_quantized(qmodel, tmp_path / "q.safetensors", model_name=FACTORY, spec=tiny_bn_model()[1],
                         quant_config=cfg)
    for folded, match in [([["stem.0", "head.1"]], r"cannot fold BatchNorm pairs \[\('stem.0', 'head.1'\)\]"),
                          ([["stem.0", "stem.1"]] * 2, "named once"), ("stem.0", "malformed plan"),
                          ([["stem.0"]], "malformed plan")]:
        bad = _tamper(src, tmp_path / "bad.safetensors", meta=lambda m, f=folded: m["plan"].update(folded=f))
        with pytest.raises(ExportFormatError, match=match):
            _load(bad)
    bad = _tamper(src, tmp_path / "bad.safetensors", meta=lambda m: m["plan"].update(fp_layers=["ghost"]))
    with pytest.raises(ExportFormatError, match=r"differs from the exported one in fp_layers \(fp_layers: rebuilt "
                                                r"\[\], file \['ghost'\]\)"):
        _load(bad)
    with pytest.raises(ConfigError, match="pairs to fold were given .* with fold_bn=False"):
        quantize(TinyNet(), QuantConfig(w_bits=4, a_bits=4), torch.zeros(1, 3, 16, 16), folded=[("stem.0", "stem.1")])


def test_an_all_zero_or_constant_layer_exports_and_reloads(tmp_path: Path) -> None:
    """Integers all equal fit every grid exactly: not a relabelled layer."""
    for value in [0.0, 0.3]:
        model = tiny_bn_model()[0]
        with torch.no_grad():
            model.head[0].weight.fill_(value)
        qmodel, cfg = _calibrated(4, 4, model=model)
        path = save_quantized(qmodel, tmp_path / "q.safetensors", model_name=FACTORY, spec=tiny_bn_model()[1],
                              quant_config=cfg)
        reloaded, _ = _load(path)
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            assert torch.allclose(reloaded(x), qmodel(x), atol=1e-5, rtol=0), value


def test_a_model_with_scales_the_loader_refuses_is_never_written(tmp_path: Path) -> None:
    spec = tiny_bn_model()[1]
    for what, value in [("weight", 0.0), ("act", 0.0), ("act", -0.5)]:
        qmodel, cfg = _calibrated(4, 4)
        with torch.no_grad():
            if what == "weight":
                qmodel.head[0].weight_quantizer.scale.view(-1)[1] = value
            else:
                qmodel.head[0].input_quantizer.scale.fill_(value)
        key = "w.head.0.scale" if what == "weight" else "a.head.0.input_quantizer.scale"
        with pytest.raises(ExportFormatError, match=f"cannot export: {key} hold step sizes .*Nothing was written"):
            save_quantized(qmodel, tmp_path / "q.safetensors", model_name=FACTORY, spec=spec, quant_config=cfg)
        assert not any(tmp_path.iterdir())


def test_metadata_nested_too_deep_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nested.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"sadag": "[" * 100_000})
    with pytest.raises(ExportFormatError, match="the sadag metadata is not valid JSON"):
        load_quantized(path)


def test_onnx_export_needs_an_onnx_with_uint2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    onnx = pytest.importorskip("onnx")
    from sadag.export.onnx_export import MAX_OPSET, ONNX_MIN_VERSION

    assert onnx.defs.onnx_opset_version() >= MAX_OPSET and hasattr(onnx.TensorProto, "UINT2")
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert f'"onnx>={ONNX_MIN_VERSION}"' in pyproject  # the floor that has opset 25 and UINT2
    monkeypatch.setattr(onnx.defs, "onnx_opset_version", lambda: 24)  # what onnx 1.19 says
    qmodel, _ = _calibrated(4, 4)
    with pytest.raises(ConfigError, match=r"needs onnx>=1\.20 .*pip install -U 'onnx>=1\.20'"):
        export_model(qmodel, tmp_path / "q.onnx", "onnx", spec=tiny_bn_model()[1])


def test_a_failed_re_export_leaves_the_earlier_one_intact(export_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from sadag.export import safetensors_io

    path = tmp_path / "q.safetensors"
    qmodel, cfg = _calibrated(4, 4)
    save_quantized(qmodel, path, model_name=FACTORY, spec=tiny_bn_model()[1], quant_config=cfg)
    before = path.read_bytes()

    def half_written(tensors, filename, metadata=None):  # noqa: ANN001, ANN202
        Path(filename).write_bytes(b"\x00" * 10)  # what an old safetensors leaves when the disk fills
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_io, "save_file", half_written)
    with pytest.raises(ExportFormatError, match="No space left"):
        save_quantized(qmodel, path, model_name=FACTORY, spec=tiny_bn_model()[1], quant_config=cfg)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["q.safetensors"]
