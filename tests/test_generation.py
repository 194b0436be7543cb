"""Synthetic data generation: losses, swing conv, generators, SADAG refinement, scheduler, I/O."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from PIL import Image
from torch import nn
from torch.func import functional_call, grad, vmap

from sadag.config import GenConfig
from sadag.errors import ConfigError, ModelError, NumericalError
from sadag.generation import (
    DevicePlateau,
    RefineCheckpoints,
    bn_layers,
    bn_statistics_loss,
    capture_bn_inputs,
    diversity_loss,
    generate_genie,
    generate_noise,
    generate_zeroq,
    gradient_cosine,
    gradient_matching_loss,
    input_prior_loss,
    load_synthetic_set,
    near_copy_mask,
    near_duplicates,
    refine_sadag,
    save_synthetic_set,
    swing_model,
    swing_shift,
)
from sadag.generation import sadag as sadag_module
from sadag.generation.common import batch_seed, tensor_lr_adam
from sadag.generation.generator import GenieGenerator
from sadag.generation.genie import init_batch
from sadag.generation.sadag import capture_linear_input, last_linear
from sadag.generation.swing import SwingConv2d
from sadag.generation.zeroq import zeroq_losses
from sadag.models.spec import DataSpec

SPEC = DataSpec(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), input_size=16, num_classes=5)


class TinyNet(nn.Module):
    """Two conv+BN layers and no residual block: the generation losses need BN layers only (conftest's
    TinyNet, with a block, is the quantization tests' model)."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


class NoBNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


class NaNNet(TinyNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * float("nan"))


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyNet:
    torch.manual_seed(seed)
    return with_bn_targets(TinyNet()).to(dtype).eval()


def with_bn_targets(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics to match, drawn from the global RNG (seed it first)."""
    for m in bn_layers(model):
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
    return model


def perturbed(model: nn.Module, scale: float = 0.05, seed: int = 1) -> nn.Module:
    q = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in q.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return q.eval()


def small_cfg(**kw) -> GenConfig:
    base = dict(num_images=8, batch_size=4, genie_iters=4, zeroq_iters=4, refine_iters=3, plateau_patience=5)
    base.update(kw)
    return GenConfig(**base)


def recorder():
    seen: list[tuple[str, int, int, dict[str, float]]] = []
    return seen, lambda stage, step, total, metrics: seen.append((stage, step, total, dict(metrics)))


# --- closed-form gradient cosine -------------------------------------------------------------------

def test_gradient_cosine_matches_autograd_per_sample_gradients() -> None:
    fp = tiny_model(dtype=torch.float64)
    q = perturbed(fp, 0.2)
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    params = {k: v.detach() for k, v in q.named_parameters()}

    def loss(weight: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        out = functional_call(q, {**params, "fc.weight": weight}, (xi.unsqueeze(0),))
        return 0.5 * (fp(xi.unsqueeze(0)) - out).square().sum()

    with torch.no_grad():
        g = vmap(grad(loss), in_dims=(None, 0))(params["fc.weight"], x).flatten(1)
    g = g / g.norm(dim=1, keepdim=True)
    expected = g @ g.T
    with torch.no_grad(), capture_linear_input(q.fc) as slot:
        e = fp(x) - q(x)
        h = slot[0]
    got = gradient_cosine(e, h, e, h)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    paired = gradient_cosine(e, h, e.roll(1, 0), h.roll(1, 0), pairwise=False)
    shifted = torch.stack([expected[i, (i - 1) % 6] for i in range(6)])
    torch.testing.assert_close(paired, shifted, atol=1e-5, rtol=0)


def test_matching_and_diversity_losses() -> None:
    e, h = torch.eye(3), torch.ones(3, 4)
    assert gradient_matching_loss(e, h, e, h).item() == pytest.approx(0.0, abs=1e-6)
    assert gradient_matching_loss(e, h, -e, h).item() == pytest.approx(2.0, abs=1e-6)
    assert diversity_loss(e, h, None, None, 0.0).item() == pytest.approx(0.0, abs=1e-6)  # self excluded
    assert diversity_loss(e, h, e, h, 0.0).item() == pytest.approx(1.0, abs=1e-6)  # earlier copies count
    assert diversity_loss(e, h, -e, h, 0.25).item() == pytest.approx(0.75, abs=1e-6)


# --- BN statistics loss --------------------------------------------------------------------------

def test_bn_loss_zero_when_batch_matches_running_stats() -> None:
    model = tiny_model()
    x = torch.randn(16, 3, 16, 16)
    layers = bn_layers(model)
    with torch.no_grad(), capture_bn_inputs(model) as captured:
        for i, layer in enumerate(layers):  # layer i's input depends only on layers < i
            model(x)
            var, mean = torch.var_mean(captured[i], dim=(0, 2, 3))
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var - 1e-6)
        model(x)
        assert bn_statistics_loss(captured, layers).item() < 1e-8
        model(x * 2 + 1)
        assert bn_statistics_loss(captured, layers).item() > 1e-2
    # hooks are gone after the context
    assert all(not layer._forward_hooks for layer in layers)


def test_input_prior_loss() -> None:
    x = torch.randn(4, 3, 16, 16)
    std, mean = torch.std_mean(x, dim=(2, 3), keepdim=True)
    assert input_prior_loss((x - mean) / std).item() < 1e-10
    assert input_prior_loss(x * 3 + 1).item() > 1.0


# --- swing convolution ----------------------------------------------------------------------------

def test_swing_conv_shapes_offsets_and_seed() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 9, 9)
    assert torch.equal(swing_shift(x, (1, 1)), x)
    shifted = [conv(swing_shift(x, (dy, dx))) for dy in range(3) for dx in range(3)]
    assert all(s.shape == conv(x).shape for s in shifted)
    assert sum(not torch.allclose(s, conv(x)) for s in shifted) == 8

    model = tiny_model()
    wrapped = swing_model(model, torch.Generator().manual_seed(3))
    assert isinstance(wrapped.conv2, SwingConv2d) and isinstance(wrapped.conv1, nn.Conv2d)
    assert isinstance(model.conv2, nn.Conv2d)  # the original is untouched
    y = torch.randn(2, 3, 16, 16)
    again = swing_model(model, torch.Generator().manual_seed(3))
    with torch.no_grad():
        outs = [wrapped(y) for _ in range(6)]
        assert all(torch.equal(a, again(y)) for a in outs)
        assert all(o.shape == model(y).shape for o in outs)
        assert any(not torch.equal(outs[0], o) for o in outs[1:])


# --- generators lower their losses ----------------------------------------------------------------

def test_genie_lowers_loss_and_restores_model() -> None:
    model = tiny_model()
    model.train()
    stats = [m.running_mean.clone() for m in bn_layers(model)]
    seen, progress = recorder()
    batches = generate_genie(model, SPEC, small_cfg(num_images=8, batch_size=8, genie_iters=25), seed=0,
                             progress=progress, log_every=1)
    losses = [m["loss"] for _, _, _, m in seen]
    assert losses[-1] < 0.9 * losses[0]  # Adam's first big steps overshoot, then it settles
    assert seen[-1][0] == "genie-d" and seen[-1][1:3] == (25, 25)
    assert batches[0].images.shape == (8, 3, 16, 16) and batches[0].z.shape == (8, 256)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(a, m.running_mean) for a, m in zip(stats, bn_layers(model), strict=True))


def test_zeroq_lowers_loss() -> None:
    seen, progress = recorder()
    images = generate_zeroq(tiny_model(), SPEC, small_cfg(num_images=4, zeroq_iters=20, zeroq_lr=0.1), seed=0,
                            progress=progress, log_every=1)
    losses = [m["loss"] for _, _, _, m in seen]
    assert images.shape == (4, 3, 16, 16)
    assert losses[-1] < 0.7 * losses[0]


def _refine_setup(iters: int = 3, **kw):
    fp = tiny_model()
    cfg = small_cfg(genie_iters=3, refine_iters=iters, **kw)
    return fp, perturbed(fp), generate_genie(fp, SPEC, cfg, seed=0), cfg


@pytest.mark.parametrize("neighbor", ["random", "adversarial"])
def test_sadag_refinement_lowers_loss(neighbor: str) -> None:
    fp, q, batches, cfg = _refine_setup(iters=25, num_images=4, refine_lr_z=0.05, refine_lr_g=0.01,
                                        refine_g_decay=0.99, neighbor=neighbor)
    seen, progress = recorder()
    q.train()
    out = refine_sadag(fp, q, batches, SPEC, cfg, seed=0, progress=progress, log_every=1)
    losses = [m["loss"] for _, _, _, m in seen]
    assert out.shape == (4, 3, 16, 16) and torch.isfinite(out).all()
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    assert q.training and all(p.requires_grad for p in q.parameters())


def test_progress_logs_first_and_every_kth_iteration() -> None:
    fp, q, batches, cfg = _refine_setup(iters=7, num_images=4, batch_size=2)
    seen, progress = recorder()
    refine_sadag(fp, q, batches, SPEC, cfg, seed=0, progress=progress, log_every=3)
    # per batch of 7: the first (starting losses), every 3rd and the last
    assert [step for _, step, _, _ in seen] == [1, 3, 6, 7, 8, 10, 13, 14]


@pytest.mark.parametrize("stage", ["genie-d", "zeroq", "sadag refine"])
def test_progress_of_batches_made_in_one_pass_moves_forward_counting_them_all(stage: str) -> None:
    """2 passes of 2 batches, 4 iterations each, every one logged: the steps count every batch's iterations, one
    apart, so a progress bar never moves back and reads the share done (not a batch's own b * iters + it + 1)."""
    model = tiny_model()
    cfg = small_cfg(num_images=12, batch_size=3, genie_iters=4, zeroq_iters=4, refine_iters=4, parallel_batches=2,
                    refine_parallel=2)
    seen, progress = recorder()
    if stage == "genie-d":
        generate_genie(model, SPEC, cfg, seed=0, progress=progress, log_every=1)
    elif stage == "zeroq":
        generate_zeroq(model, SPEC, cfg, seed=0, progress=progress, log_every=1)
    else:
        batches = generate_genie(model, SPEC, cfg, seed=0)
        refine_sadag(model, perturbed(model), batches, SPEC, cfg, seed=0, progress=progress, log_every=1)
    assert [(name, step, total) for name, step, total, _ in seen] == [(stage, k, 16) for k in range(1, 17)]
    # each record still names its batch (metrics.jsonl's curves are per batch): a pass's batches in turn
    assert [int(m["batch"]) for *_, m in seen] == [0, 1] * 4 + [2, 3] * 4


def test_genie_inspector_sees_each_log_point_without_changing_the_images() -> None:
    model, cfg = tiny_model(), small_cfg(num_images=6, batch_size=3, genie_iters=5)
    seen: list[tuple[int, int, tuple[int, ...], tuple[int, ...]]] = []
    inspected = generate_genie(model, SPEC, cfg, seed=3, log_every=2,
                               on_log=lambda b, it, gen, z, x: seen.append((b, it, tuple(z.shape), tuple(x.shape))))
    # per batch of 5 iterations: the first, every 2nd and the last
    assert [(b, it) for b, it, _, _ in seen] == [(0, 0), (0, 1), (0, 3), (0, 4), (1, 0), (1, 1), (1, 3), (1, 4)]
    assert all(z == (3, cfg.latent_dim) and x == (3, 3, SPEC.input_size, SPEC.input_size) for _, _, z, x in seen)
    plain = generate_genie(model, SPEC, cfg, seed=3)
    assert all(torch.equal(a.images, b.images) for a, b in zip(inspected, plain, strict=True))


# --- reproducibility and resume -------------------------------------------------------------------

def test_genie_seeded_and_batches_independent() -> None:
    model, cfg = tiny_model(), small_cfg(num_images=10, batch_size=4)
    full = generate_genie(model, SPEC, cfg, seed=7)
    assert [b.images.shape[0] for b in full] == [4, 4, 2]
    again = generate_genie(model, SPEC, cfg, seed=7)
    assert all(torch.equal(a.images, b.images) for a, b in zip(full, again, strict=True))
    other = generate_genie(model, SPEC, cfg, seed=8)
    assert not torch.allclose(full[0].images, other[0].images)
    finished: list[int] = []
    resumed = generate_genie(model, SPEC, cfg, seed=7, done={0: full[0], 2: full[2]},
                             on_batch=lambda b: finished.append(b.index))
    assert finished == [1]
    assert torch.equal(resumed[1].images, full[1].images) and torch.equal(resumed[1].z, full[1].z)


def test_a_batch_generator_is_seeded_without_touching_the_callers_random_state(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = small_cfg()
    with torch.random.fork_rng(devices=[]):  # the weights as torch.manual_seed seeded them before
        torch.manual_seed(batch_seed(3, 1, "genie-g"))
        expected = GenieGenerator(SPEC.input_size, cfg.latent_dim).state_dict()
    reseeded: list[int] = []  # torch.manual_seed reseeds every CUDA device, which fork_rng(devices=[]) leaves changed
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", reseeded.append)
    before = torch.get_rng_state()
    gen, _ = init_batch(SPEC, cfg, 3, 1, 4, torch.device("cpu"))
    assert reseeded == [] and torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(value, gen.state_dict()[k]) for k, value in expected.items())  # the same initial weights


def test_zeroq_and_noise_seeded() -> None:
    model, cfg = tiny_model(), small_cfg(num_images=4, zeroq_iters=3)
    assert torch.equal(generate_zeroq(model, SPEC, cfg, 1), generate_zeroq(model, SPEC, cfg, 1))
    assert not torch.allclose(generate_zeroq(model, SPEC, cfg, 1), generate_zeroq(model, SPEC, cfg, 2))
    assert torch.equal(generate_noise(SPEC, 5, 3), generate_noise(SPEC, 5, 3))
    assert not torch.allclose(generate_noise(SPEC, 5, 3), generate_noise(SPEC, 5, 4))
    assert generate_noise(SPEC, 5, 3).shape == (5, 3, 16, 16)


def test_sadag_seeded_and_resumable() -> None:
    fp, q, batches, cfg = _refine_setup()
    saved: dict[int, dict] = {}
    full = refine_sadag(fp, q, batches, SPEC, cfg, seed=0, on_batch=saved.__setitem__)
    assert torch.equal(full, refine_sadag(fp, q, batches, SPEC, cfg, seed=0))
    got: list[int] = []
    resumed = refine_sadag(fp, q, batches, SPEC, cfg, seed=0, done={0: saved[0]},
                           on_batch=lambda i, _x: got.append(i))
    assert got == [1] and torch.equal(resumed, full)  # batch 0's saved e and h: the same diversity pool
    # a checkpoint of images only (earlier versions): the pool recomputed, equal within float rounding
    resumed = refine_sadag(fp, q, batches, SPEC, cfg, seed=0, done={0: full[:4]})
    torch.testing.assert_close(resumed, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("batch", "saved_as"), [(0, "group"), (1, "group"), (1, "one batch")])
def test_sadag_resumes_mid_batch_exactly(tmp_path, batch: int, saved_as: str) -> None:
    """saved_as "one batch": the checkpoint of a version before gen.refine_parallel, one batch's keys at the top."""
    fp, q, batches, cfg = _refine_setup(iters=7, plateau_patience=1)
    full = refine_sadag(fp, q, batches, SPEC, cfg, seed=0)
    done = {0: full[:4]} if batch == 1 else {}  # batch 1 killed in a run that resumed after batch 0
    reference = refine_sadag(fp, q, batches, SPEC, cfg, seed=0, done=done)

    class Killed(Exception):
        pass

    def save(state: dict) -> None:
        torch.save(state, tmp_path / "state.pt")
        if (state["batches"], state["iteration"]) == ([batch], 4):
            raise Killed

    with pytest.raises(Killed):
        refine_sadag(fp, q, batches, SPEC, cfg, seed=0, done=done, checkpoints=RefineCheckpoints(save, every=2))
    state = torch.load(tmp_path / "state.pt", weights_only=True)  # plain tensors and values only
    if saved_as == "one batch":
        state = {**state["per_batch"][0], "batch": batch, "iteration": state["iteration"]}
    got: list[int] = []
    resumed = refine_sadag(fp, q, batches, SPEC, cfg, seed=0, done=done, on_batch=lambda i, _x: got.append(i),
                           checkpoints=RefineCheckpoints(every=2, resume=state))
    assert got == [0, 1][batch:]
    assert torch.equal(resumed, reference)  # the killed batch continued from step 4, bit for bit


def test_mid_batch_checkpoints_keep_their_cost_under_five_percent(monkeypatch: pytest.MonkeyPatch) -> None:
    from sadag.generation import common

    now = [100.0]
    monkeypatch.setattr(common.time, "monotonic", lambda: now[0])
    clock = common.CheckpointClock(every=2, seconds=300)
    assert not clock.due(2, 10)  # not before 300 s
    now[0] += 300
    assert not clock.due(3, 10) and not clock.due(10, 10) and clock.due(4, 10)  # multiples of every, not the end

    def slow_write(_done: int) -> None:
        now[0] += 30  # a save of 30 s: the next one waits 20 x 30 = 600 s, more than the 300 asked
    clock.save(slow_write, 4)
    now[0] += 599
    assert not clock.due(6, 10)
    now[0] += 1
    assert clock.due(6, 10)


# --- errors ---------------------------------------------------------------------------------------

def test_model_without_bn_raises_model_error() -> None:
    cfg = small_cfg()
    for call in (lambda: generate_genie(NoBNNet(), SPEC, cfg, 0), lambda: generate_zeroq(NoBNNet(), SPEC, cfg, 0)):
        with pytest.raises(ModelError, match="noise") as info:
            call()
        assert "real" in str(info.value) and "BatchNorm" in str(info.value)


class AuxNet(TinyNet):
    """TinyNet plus an auxiliary conv+BN head that runs only in training (as Inception's aux logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.aux_conv = nn.Conv2d(8, 4, 1, bias=False)
        self.aux_bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.aux_bn(self.aux_conv(torch.relu(self.bn1(self.conv1(x)))))
        return super().forward(x)


class TrainOnlyBNNet(nn.Module):
    """BN layers, but none of them in the eval-mode forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc((self.bn(y) if self.training else y).mean(dim=(2, 3)))


def _aux_copy(model: TinyNet) -> AuxNet:
    aux = AuxNet()
    aux.load_state_dict(model.state_dict(), strict=False)
    return aux.eval()


def test_bn_layers_the_forward_skips_are_left_out_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    tiny = tiny_model()
    aux, cfg = _aux_copy(tiny), small_cfg(num_images=4, genie_iters=3, zeroq_iters=3, refine_iters=2)
    with caplog.at_level("WARNING", logger="sadag.generation.bn_stats"):
        batches = generate_genie(aux, SPEC, cfg, seed=0)
    assert "aux_bn" in caplog.text and "bn1" not in caplog.text
    # the layers the forward reaches are matched exactly as in the model without the head
    assert torch.equal(batches[0].images, generate_genie(tiny, SPEC, cfg, seed=0)[0].images)
    assert torch.equal(generate_zeroq(aux, SPEC, cfg, 0), generate_zeroq(tiny, SPEC, cfg, 0))
    q = perturbed(tiny)
    assert torch.equal(refine_sadag(aux, q, batches, SPEC, cfg, seed=0), refine_sadag(tiny, q, batches, SPEC, cfg, 0))
    assert aux.aux_bn.training is False and all(p.requires_grad for p in aux.parameters())


def test_no_bn_layer_reached_raises_model_error() -> None:
    cfg = small_cfg()
    for call in (lambda: generate_genie(TrainOnlyBNNet().eval(), SPEC, cfg, 0),
                 lambda: generate_zeroq(TrainOnlyBNNet().eval(), SPEC, cfg, 0)):
        with pytest.raises(ModelError, match=r"reaches none of its BatchNorm2d layers \(bn\)"):
            call()


def test_a_hooked_bn_layer_without_input_raises_model_error() -> None:
    layers, x = bn_layers(tiny_model()), torch.randn(2, 3, 16, 16)
    for call in (lambda: bn_statistics_loss([torch.randn(2, 8, 16, 16), None], layers),
                 lambda: zeroq_losses([torch.randn(2, 8, 16, 16), None], layers, x)):
        with pytest.raises(ModelError, match=r"did not reach the hooked BatchNorm2d layer\(s\) number \[1\]"):
            call()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_in_another_dtype_is_refused_naming_the_fix(dtype: torch.dtype) -> None:
    """The generators, latents and ZeroQ's pixels are float32: another model dtype failed inside conv2d."""
    other, cfg = tiny_model(dtype=dtype), small_cfg(num_images=4, genie_iters=1, zeroq_iters=1, refine_iters=1)
    batches = generate_genie(tiny_model(), SPEC, cfg, seed=0)
    for call in (lambda: generate_genie(other, SPEC, cfg, 0), lambda: generate_zeroq(other, SPEC, cfg, 0),
                 lambda: refine_sadag(other, perturbed(other), batches, SPEC, cfg, 0),
                 lambda: refine_sadag(tiny_model(), other, batches, SPEC, cfg, 0)):
        with pytest.raises(ModelError, match=rf"parameters in {dtype} \(conv1.weight and 7 more\).*model\.float\(\)"):
            call()


def test_the_generator_refuses_an_input_size_it_cannot_make_naming_other_methods() -> None:
    for size in (30, 2):
        with pytest.raises(ConfigError, match=rf"input size is {size}: use --method zeroq or --method noise"):
            GenieGenerator(size)


class SENet(TinyNet):
    """The classifier declared before a squeeze-and-excitation block whose Linear layers run before it (as in
    MobileNetV3 or EfficientNet), and optionally a training-only head declared after it: in module order either
    passes for the last linear layer."""

    def __init__(self, head: bool) -> None:
        super().__init__()
        self.se = nn.Sequential(nn.Linear(12, 3), nn.ReLU(), nn.Linear(3, 12), nn.Sigmoid())
        self.aux_head = nn.Linear(12, 5) if head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = x * self.se(x.mean(dim=(2, 3)))[:, :, None, None]
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("head", [False, True], ids=["se-block", "se-block-and-unused-head"])
def test_sadag_takes_h_at_the_last_linear_layer_the_forward_calls(monkeypatch: pytest.MonkeyPatch,
                                                                  head: bool) -> None:
    torch.manual_seed(0)
    fp = with_bn_targets(SENet(head)).eval()
    q, cfg = perturbed(fp), small_cfg(num_images=4, genie_iters=2, refine_iters=2)
    hooked: list[nn.Module] = []
    capture = sadag_module.capture_linear_input
    monkeypatch.setattr(sadag_module, "capture_linear_input", lambda layer: (hooked.append(layer), capture(layer))[1])
    images = refine_sadag(fp, q, generate_genie(fp, SPEC, cfg, seed=0), SPEC, cfg, seed=0)
    assert hooked == [q.fc] and torch.isfinite(images).all()


class UnusedLinearNet(TinyNet):
    """Its only nn.Linear is never called by the eval-mode forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))).mean(dim=(2, 3))[:, :5]


def test_a_model_whose_forward_calls_no_linear_layer_is_refused_for_sadag() -> None:
    with pytest.raises(ModelError, match=r"UnusedLinearNet: the eval-mode forward pass calls none of its nn.Linear "
                                         r"layers \(fc\).*use --method genie"):
        last_linear(UnusedLinearNet().eval(), SPEC.input_size)


def test_nan_loss_raises_numerical_error_naming_stage() -> None:
    with pytest.raises(NumericalError, match="genie-d batch 0"):
        generate_genie(NaNNet().eval(), SPEC, small_cfg(), 0)
    with pytest.raises(NumericalError, match="zeroq batch 0 iteration"):
        generate_zeroq(NaNNet().eval(), SPEC, small_cfg(), 0)


# --- device-side plateau --------------------------------------------------------------------------

def test_device_plateau_matches_torch() -> None:
    losses = [5.0, 4.0, 3.99999, 3.9, 3.9, 3.9, 3.9, 3.9, 3.8, float("nan"), 3.8, 3.8, 3.8, 3.8]
    losses += [3.8] * 30 + [1.0] + [1.0 - 1e-6 * i for i in range(20)]
    for patience, min_lr in ((2, 1e-4), (3, 0.0), (0, 1e-3)):
        ref_p = nn.Parameter(torch.zeros(1))
        ref_opt = torch.optim.SGD([ref_p], lr=0.1)
        ref = torch.optim.lr_scheduler.ReduceLROnPlateau(ref_opt, factor=0.1, patience=patience, min_lr=min_lr)
        opt = tensor_lr_adam([nn.Parameter(torch.zeros(1))], 0.1, torch.device("cpu"))
        ours = DevicePlateau(opt.param_groups[0]["lr"], patience=patience, min_lr=min_lr)
        for loss in losses:
            ref.step(loss)
            ours.step(torch.tensor(loss, dtype=torch.float32))
            assert ours.lr.item() == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12, abs=0)
        assert opt.param_groups[0]["lr"] is ours.lr


def test_tensor_lr_drives_adam() -> None:
    p = nn.Parameter(torch.zeros(3))
    opt = tensor_lr_adam([p], 0.5, torch.device("cpu"))
    opt.param_groups[0]["lr"].fill_(0.01)
    p.grad = torch.ones(3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), -0.01), atol=1e-6, rtol=0)


# --- save / load ----------------------------------------------------------------------------------

def test_near_duplicates_counts_copies_not_brightness() -> None:
    gen = torch.Generator().manual_seed(0)
    distinct = torch.randn(20, 3, 64, 64, generator=gen)
    assert near_duplicates(distinct) == 0
    collapsed = distinct.clone()
    collapsed[5:10] = distinct[4] * 2.0 + 0.3  # 5 copies of image 4 (rescaled, shifted): 6 with a partner
    collapsed[15] = distinct[14] + 0.01 * torch.randn(3, 64, 64, generator=gen)  # and one noisy copy
    assert near_duplicates(collapsed) == 8
    assert near_duplicates(collapsed, chunk=3) == 8  # chunking changes nothing
    assert near_duplicates(collapsed[:1]) == 0
    assert near_copy_mask(collapsed).nonzero().flatten().tolist() == [4, 5, 6, 7, 8, 9, 14, 15]


def test_save_load_round_trip(tmp_path) -> None:
    images = torch.randn(70, 3, 16, 16)
    save_synthetic_set(tmp_path / "set", images, SPEC, {"method": "genie", "seed": 3})
    loaded, info = load_synthetic_set(tmp_path / "set")
    assert torch.equal(loaded, images) and loaded.dtype == torch.float32
    assert info["spec"] == SPEC and info["meta"] == {"method": "genie", "seed": 3}
    with Image.open(tmp_path / "set" / "grid.png") as grid:
        assert grid.format == "PNG" and grid.mode == "RGB"
        assert grid.size == (8 * 18 + 2, 8 * 18 + 2)  # 64 images, 8 x 8 with 2-pixel gaps
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == ["grid.png", "images.pt"]


def test_refine_requires_matching_done_shapes() -> None:
    fp, q, batches, cfg = _refine_setup()
    with pytest.raises(ConfigError, match="checkpointed SADAG batch 0"):
        refine_sadag(fp, q, batches, SPEC, replace(cfg), seed=0, done={0: torch.zeros(3, 3, 16, 16)})
    images = batches[0].images
    for entry in ({"images": images}, {"images": images, "e": torch.zeros(4, 10), "h": torch.zeros(3, 8)}):
        with pytest.raises(ConfigError, match="checkpointed SADAG batch 0 is not a refined batch"):
            refine_sadag(fp, q, batches, SPEC, cfg, seed=0, done={0: entry})


def _bn_after_global_pool() -> nn.Module:
    """A valid head: BatchNorm on the pooled 1x1 features, one value per channel and image."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 10)).eval()


@pytest.mark.parametrize(("make", "cfg"), [
    (generate_zeroq, GenConfig(num_images=4, batch_size=4, zeroq_iters=3)),  # per-sample std of a 1x1 map
    (generate_genie, GenConfig(num_images=1, batch_size=1, genie_iters=3)),  # batch std of one value
    (generate_genie, GenConfig(num_images=5, batch_size=4, genie_iters=3)),  # a last batch of one image
])
def test_one_value_per_channel_gives_no_nan(make, cfg: GenConfig) -> None:
    torch.manual_seed(0)
    spec = DataSpec(mean=(0.5,) * 3, std=(0.25,) * 3, input_size=8, num_classes=10)
    out = make(_bn_after_global_pool(), spec, cfg, 0)
    images = out if isinstance(out, torch.Tensor) else torch.cat([b.images for b in out])
    assert images.shape[0] == cfg.num_images and bool(images.isfinite().all())


def test_generation_restores_each_submodules_mode() -> None:
    model = tiny_model().train()
    model.bn1.eval()  # a caller's mixed modes (e.g. frozen BN statistics while fine-tuning)
    generate_genie(model, SPEC, small_cfg(num_images=2, batch_size=2, genie_iters=1), 0)
    assert model.training and not model.bn1.training and model.bn2.training
