"""User models: load_model's fit check against the DataSpec, the spec a module carries, module:factory errors,
and BatchNorm layers without running statistics or of another kind (SyncBatchNorm)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sadag import GenConfig, QuantConfig, quantize
from sadag.errors import ModelError
from sadag.generation import bn_layers, generate_genie, generate_zeroq
from sadag.models import DataSpec, load_model
from sadag.models.registry import check_model_fits_spec
from sadag.quantization.fold import bn_affine, fold_bn_

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = DataSpec(mean=(0.5,) * 3, std=(0.25,) * 3, input_size=16, num_classes=10)


def small_cnn(classes: int = 10, bn: type[nn.Module] = nn.BatchNorm2d, **bn_kwargs) -> nn.Sequential:
    """conv-BN-ReLU twice, global pooling, a linear head; BN statistics made non-trivial, eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), bn(8, **bn_kwargs), nn.ReLU(),
                          nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False), bn(12, **bn_kwargs), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, classes))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def flat_cnn() -> nn.Sequential:
    """A model that only runs on 16x16 inputs (its head reads the flattened feature map)."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 16 * 16, 10))


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """Write tmp_path/<name>.py with `source` and put tmp_path on sys.path: make(name, source) -> name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written: list[str] = []

    def make(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text("import torch\nfrom torch import nn\nfrom sadag.models import DataSpec\n"
                                             "from test_user_models import flat_cnn, small_cnn\n" + source)
        written.append(name)
        return name

    yield make
    for name in written:
        sys.modules.pop(name, None)


# --- A: the model must fit its DataSpec ------------------------------------------------------------------
def test_output_width_differing_from_the_spec_is_refused(user_module) -> None:
    mod = user_module("wrong_head_zoo", "def f():\n    return small_cnn(classes=100), "
                                        "DataSpec((0.5,) * 3, (0.25,) * 3, 16, 10)\n")
    with pytest.raises(ModelError) as info:
        load_model(f"{mod}:f")
    msg = str(info.value)
    assert "(2, 100)" in msg and "num_classes 10" in msg and "(2, 3, 16, 16)" in msg and "DataSpec" in msg
    with pytest.raises(ModelError, match=r"returns shape \(2, 100\)"):
        load_model(small_cnn(classes=100), spec=SPEC)


def test_model_failing_at_the_spec_input_size_is_refused() -> None:
    with pytest.raises(ModelError, match=r"input_size 32.*fails on an input of shape \(2, 3, 32, 32\)") as info:
        load_model(flat_cnn(), spec=DataSpec(SPEC.mean, SPEC.std, 32, 10))
    assert "Traceback" not in str(info.value)
    assert load_model(flat_cnn(), spec=SPEC)[1] is SPEC


def test_model_without_spec_is_refused_with_how_to_declare_one(user_module, caplog) -> None:
    mod = user_module("no_spec_zoo", "def f():\n    return small_cnn()\n")
    with pytest.raises(ModelError) as info:
        load_model(f"{mod}:f")
    msg = str(info.value)
    assert "no DataSpec was given" in msg and "ImageNet" in msg and "(2, 10)" in msg
    assert "return net, DataSpec(" in msg and "model.sadag_spec" in msg
    with pytest.raises(ModelError, match=r"load_model\(model, spec=DataSpec"):
        load_model(small_cnn())
    # An ImageNet-shaped model without a spec is still accepted, with the warning.
    mod = user_module("imagenet_zoo", "def f():\n    return small_cnn(classes=1000)\n")
    with caplog.at_level("WARNING"):
        _, spec = load_model(f"{mod}:f")
    assert spec.input_size == 224 and spec.num_classes == 1000 and "ImageNet" in caplog.text


def test_forward_returning_no_tensor_is_refused() -> None:
    class DictOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = small_cnn()

        def forward(self, x: torch.Tensor) -> dict:
            return {"logits": self.net(x)}

    with pytest.raises(ModelError, match="returns a dict.*logits tensor"):
        load_model(DictOut(), spec=SPEC)


def test_fit_check_restores_modes_and_keeps_the_statistics() -> None:
    model = small_cnn().train()
    model[1].eval()  # mixed modes, e.g. a frozen BN
    before = copy.deepcopy(model.state_dict())
    check_model_fits_spec(model, SPEC, "small_cnn", "test")
    assert model.training and not model[1].training and model[4].training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_builtin_model_fits_its_spec() -> None:
    model, spec = load_model("resnet20_cifar10", pretrained=False)
    assert (spec.input_size, spec.num_classes) == (32, 10) and not model.training


# --- B: a module's own spec is kept ----------------------------------------------------------------------
def test_module_keeps_the_spec_it_carries() -> None:
    model, spec = load_model(small_cnn(), spec=SPEC)
    again, spec2 = load_model(model)
    assert again is model and spec2 is SPEC and model.sadag_spec is SPEC
    other = DataSpec((0.4,) * 3, (0.2,) * 3, 16, 10)
    assert load_model(model, spec=other)[1] is other  # an explicit spec still wins
    model.sadag_spec = {"input_size": 16}
    with pytest.raises(ModelError, match="sadag_spec is a dict, not a sadag DataSpec"):
        load_model(model)


def test_factory_model_carrying_a_spec_keeps_it(user_module) -> None:
    mod = user_module("carry_zoo", "def f():\n    m = small_cnn()\n"
                                   "    m.sadag_spec = DataSpec((0.5,) * 3, (0.25,) * 3, 16, 10)\n    return m\n")
    assert load_model(f"{mod}:f")[1] == SPEC


# --- C: module:factory errors ----------------------------------------------------------------------------
def test_factory_needing_arguments_is_a_model_error(user_module) -> None:
    mod = user_module("args_zoo", "def needs(depth):\n    return small_cnn()\n"
                                  "class Net(nn.Module):\n    def __init__(self, width):\n        super().__init__()\n")
    for name in ("needs", "Net"):
        with pytest.raises(ModelError, match=rf"{mod}:{name}\(\) failed: .*must take no arguments"):
            load_model(f"{mod}:{name}")


def test_type_error_inside_the_factory_is_not_masked(user_module) -> None:
    mod = user_module("buggy_zoo", "def f():\n    return small_cnn(classes='ten')\n")
    with pytest.raises(TypeError):
        load_model(f"{mod}:f")


def test_module_instance_or_non_callable_is_not_a_factory(user_module) -> None:
    mod = user_module("instance_zoo", "NET = small_cnn()\nSPEC = DataSpec((0.5,) * 3, (0.25,) * 3, 16, 10)\n")
    with pytest.raises(ModelError, match=r"nn.Module instance \(Sequential\), not a factory.*def make_model"):
        load_model(f"{mod}:NET")
    with pytest.raises(ModelError, match="is a DataSpec, not a function"):
        load_model(f"{mod}:SPEC")


def test_missing_module_hints_at_the_search_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "not_on_path_zoo.py").write_text("def f():\n    pass\n")
    with pytest.raises(ModelError, match="No module named 'not_on_path_zoo'") as info:
        load_model("not_on_path_zoo:f")
    msg = str(info.value)
    assert "in the current folder" in msg and "PYTHONPATH=." in msg and "python -m sadag" in msg
    assert "not_on_path_zoo" not in sys.modules
    with pytest.raises(ModelError, match="cannot import") as info:
        load_model("absent_zoo_module:f")
    assert "PYTHONPATH" in str(info.value)


def test_missing_dependency_of_a_found_module_has_no_path_hint(user_module) -> None:
    mod = user_module("dep_zoo", "import absent_dependency_of_dep_zoo  # noqa\ndef f():\n    pass\n")
    with pytest.raises(ModelError, match="absent_dependency_of_dep_zoo") as info:
        load_model(f"{mod}:f")
    assert "PYTHONPATH" not in str(info.value)


def test_cli_reports_a_bad_factory_as_a_message(user_module, cli, tmp_path: Path) -> None:
    mod = user_module("cli_zoo", "def needs(depth):\n    return small_cnn()\n")
    code, _, err = cli(["evaluate", "--model", f"{mod}:needs", "--data", tmp_path])
    assert code == 2 and "must take no arguments" in err and "Traceback" not in err


# --- D: BatchNorm without running statistics, SyncBatchNorm ------------------------------------------------
GEN = GenConfig(num_images=4, batch_size=4, genie_iters=2, zeroq_iters=2)


@pytest.mark.parametrize("generate", [generate_genie, generate_zeroq])
def test_bn_without_running_statistics_is_a_model_error(generate) -> None:  # noqa: ANN001
    model = small_cnn(track_running_stats=False)
    with pytest.raises(ModelError, match=r"BatchNorm layer\(s\) 1, 4 have no running statistics") as info:
        generate(model, SPEC, GEN, 0)
    assert "track_running_stats=True" in str(info.value) and "--method noise" in str(info.value)


def test_fold_skips_bn_without_running_statistics() -> None:
    model = small_cnn(track_running_stats=False)
    x = torch.randn(2, 3, 16, 16)
    reference = model(x)
    assert fold_bn_(model, x[:1]) == []
    assert isinstance(model[1], nn.BatchNorm2d) and torch.equal(model(x), reference)
    with pytest.raises(ModelError, match="no running statistics"):
        bn_affine(model[1], None)
    q = quantize(small_cnn(track_running_stats=False), QuantConfig(w_bits=8, a_bits=8, fold_bn=True), x[:1])
    assert sum(isinstance(m, nn.BatchNorm2d) for m in q.modules()) == 2
    folded = quantize(small_cnn(), QuantConfig(w_bits=8, a_bits=8, fold_bn=True), x[:1])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


@pytest.mark.parametrize("generate", [generate_genie, generate_zeroq])
def test_sync_batchnorm_generates_as_batchnorm2d(generate) -> None:  # noqa: ANN001
    plain = small_cnn()
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain)).eval()
    assert len(bn_layers(sync)) == 2 and all(isinstance(m, nn.SyncBatchNorm) for m in bn_layers(sync))
    def images(model: nn.Module) -> torch.Tensor:
        out = generate(model, SPEC, GEN, 0)
        return torch.cat([b.images for b in out]) if isinstance(out, list) else out

    assert torch.equal(images(sync), images(plain))


def test_sync_batchnorm_folds_as_batchnorm2d() -> None:
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(small_cnn()).eval()
    x = torch.randn(2, 3, 16, 16)
    reference = sync(x)
    assert fold_bn_(sync, x[:1]) == [("0", "1"), ("3", "4")]
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in sync.modules())
    torch.testing.assert_close(sync(x), reference, rtol=1e-5, atol=1e-5)
