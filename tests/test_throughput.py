"""The fast engines against the reference ones: batched Genie-D, fused BN loss, the reconstruction step."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch
from torch import nn

from conftest import TinyNet, randomize_bn_
from sadag.config import CalibConfig, QuantConfig
from sadag.generation import RefineCheckpoints, generate_genie, generate_zeroq, refine_sadag
from sadag.generation.bn_stats import bn_layers, bn_statistics_losses, capture_bn_inputs, input_prior_losses
from sadag.generation.generator import GenieGenerator, grouped_forward
from sadag.generation.genie import auto_parallel_batches, batch_groups
from sadag.generation.sadag import diversity_losses
from sadag.quantization.fold import bn_fused_into_convs
from sadag.quantization.modules import QuantConv2d, is_quant_layer
from sadag.quantization.prepare import quantize
from sadag.quantization.primitives import is_channels_last, keep_mask, rectified_sigmoid
from sadag.quantization.quantizers import ActQuantizer, WeightQuantizer
from sadag.reconstruction.reconstruct import MinibatchSampler, _optimizers, reconstruct_
from test_generation import SPEC, perturbed, small_cfg, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def float64():
    """Rounding noise below Adam's eps: the engines then agree to the last bit, iteration after iteration.

    In float32 Adam's first steps turn rounding-level gradients (e.g. of the generator's conv biases, whose
    exact gradient is 0 before a train-mode BN) into lr-sized moves: two runs of the per-batch loop differ
    by 0.3 after 5 ResNet-20 iterations with only the thread count changed.
    """
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(saved)


def _assert_same(a, b, atol: float = 0.0) -> None:  # noqa: ANN001
    for x, y in zip(a, b, strict=True):
        assert x.index == y.index
        torch.testing.assert_close(x.images, y.images, atol=atol, rtol=0)
        torch.testing.assert_close(x.z, y.z, atol=atol, rtol=0)
        for k, v in x.generator_state.items():
            torch.testing.assert_close(v, y.generator_state[k], atol=atol, rtol=0, msg=k)


def test_batched_genie_matches_the_per_batch_loop(float64) -> None:
    model = tiny_model(dtype=torch.float64)  # its stride-2 conv is swung: per-slice offsets are checked
    cfg = small_cfg(num_images=10, batch_size=3, genie_iters=12, plateau_patience=2, g_decay_every=5)
    loop = generate_genie(model, SPEC, replace(cfg, parallel_batches=1), seed=4)
    batched = generate_genie(model, SPEC, replace(cfg, parallel_batches=3), seed=4)
    # one batch's generator runs channels_last on CPU, the grouped one NCHW: other rounding, which Adam moves
    # to about lr * 1e-9 a step where an exact gradient is 0 (the conv bias before a train-mode BN)
    _assert_same(loop, batched, atol=1e-9)
    assert not torch.allclose(loop[0].images, loop[1].images)


def test_batched_zeroq_matches_the_per_batch_loop(float64) -> None:
    model = tiny_model(dtype=torch.float64)
    cfg = small_cfg(num_images=7, batch_size=3, zeroq_iters=6, plateau_patience=1)
    loop = generate_zeroq(model, SPEC, replace(cfg, parallel_batches=1), seed=2)
    batched = generate_zeroq(model, SPEC, replace(cfg, parallel_batches=2), seed=2)
    torch.testing.assert_close(loop, batched, atol=1e-12, rtol=0)


def test_batched_genie_first_step_float32() -> None:
    cfg = small_cfg(num_images=6, batch_size=3, genie_iters=1)
    loop = generate_genie(tiny_model(), SPEC, replace(cfg, parallel_batches=1), seed=0)
    batched = generate_genie(tiny_model(), SPEC, replace(cfg, parallel_batches=2), seed=0)
    for a, b in zip(loop, batched, strict=True):
        torch.testing.assert_close(a.images, b.images, atol=1e-5, rtol=1e-5)


def test_batched_genie_resumes_after_a_kill_to_the_same_floats() -> None:
    cfg = small_cfg(num_images=12, batch_size=3, genie_iters=4, parallel_batches=2)
    full = generate_genie(tiny_model(), SPEC, cfg, seed=1)
    saved: dict = {}

    class Killed(Exception):
        pass

    def save(batch) -> None:  # noqa: ANN001
        saved[batch.index] = batch
        if len(saved) == 3:  # killed inside the second group: its first batch is checkpointed
            raise Killed

    with pytest.raises(Killed):
        generate_genie(tiny_model(), SPEC, cfg, seed=1, on_batch=save)
    finished: list[int] = []
    resumed = generate_genie(tiny_model(), SPEC, cfg, seed=1, done=dict(saved),
                             on_batch=lambda b: finished.append(b.index))
    assert finished == [2, 3]  # batch 2 was saved, batch 3 not: their group is made again whole, as it was
    _assert_same(full, resumed)
    set_scope = replace(cfg, bn_scope="set", parallel_batches=0)  # one objective over all 4 batches
    full = generate_genie(tiny_model(), SPEC, set_scope, seed=1)
    saved.clear()
    with pytest.raises(Killed):
        generate_genie(tiny_model(), SPEC, set_scope, seed=1, on_batch=save)
    _assert_same(full, generate_genie(tiny_model(), SPEC, set_scope, seed=1, done=dict(saved)))


def test_genie_resumes_mid_group_exactly(tmp_path) -> None:
    cfg = small_cfg(num_images=6, batch_size=3, genie_iters=7, plateau_patience=1, g_decay_every=2,
                    parallel_batches=2)
    full = generate_genie(tiny_model(), SPEC, cfg, seed=5)

    class Killed(Exception):
        pass

    def save(state: dict) -> None:
        torch.save(state, tmp_path / "state.pt")
        if state["iteration"] == 4:
            raise Killed

    with pytest.raises(Killed):
        generate_genie(tiny_model(), SPEC, cfg, seed=5, on_state=save, state_every=2)
    state = torch.load(tmp_path / "state.pt", weights_only=True)  # plain tensors and values only
    assert state["iteration"] == 4 and state["batches"] == [0, 1]
    resumed = generate_genie(tiny_model(), SPEC, cfg, seed=5, resume_state=state)
    _assert_same(full, resumed)


def test_batch_groups_are_cut_from_all_batches() -> None:
    assert batch_groups([4, 4, 4, 4, 2], 2, {}) == [[0, 1], [2, 3], [4]]
    assert batch_groups([4, 4, 4, 4, 2], 3, {1: None}) == [[0, 1, 2], [3], [4]]  # a partly done group: whole
    assert batch_groups([4, 4, 4, 4, 2], 2, {0: None, 1: None, 4: None}) == [[2, 3]]
    assert batch_groups([4, 4, 2], 0 or 1, {}) == [[0], [1], [2]]
    assert auto_parallel_batches(tiny_model(), SPEC, 4, 8) == 1  # CPU: one by one


def test_grouped_generator_matches_each_generator(float64) -> None:
    gens = [GenieGenerator(16, 8).train() for _ in range(3)]
    twins = [GenieGenerator(16, 8).train() for _ in range(3)]
    for g, t in zip(gens, twins, strict=True):
        t.load_state_dict(g.state_dict())
    z = torch.randn(3, 5, 8)
    out = grouped_forward(gens, z)
    ref = torch.cat([t(zz) for t, zz in zip(twins, z, strict=True)])
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    for g, t in zip(gens, twins, strict=True):  # running statistics written back per generator
        for (k, a), b in zip(g.state_dict().items(), t.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=k)


def test_fused_bn_loss_matches_std_mean() -> None:
    model = tiny_model()
    x = torch.randn(8, 3, 16, 16) * 2 + 1
    layers = bn_layers(model)
    with torch.no_grad(), capture_bn_inputs(model) as captured:
        model(x)
        per_batch = bn_statistics_losses(captured, layers, 2)
        for g in range(2):
            ref = 0.0
            for a, m in zip(captured, layers, strict=True):
                s, mu = torch.std_mean(a[4 * g:4 * g + 4].double(), dim=(0, 2, 3))
                target = (m.running_var.double() + 1e-6).sqrt()
                ref += ((mu - m.running_mean).square().sum() + (s - target).square().sum()) / mu.numel()
            torch.testing.assert_close(per_batch[g].double(), ref, rtol=1e-5, atol=1e-6)
    prior = input_prior_losses(x, 2)
    s, mu = torch.std_mean(x[:4], dim=(2, 3))
    torch.testing.assert_close(prior[0], (mu.square().sum() + (s - 1).square().sum()) / 4)


# --- reconstruction step ---------------------------------------------------------------------------

def test_minibatches_are_permuted_epochs() -> None:
    gen = torch.Generator().manual_seed(0)
    sampler = MinibatchSampler(10, 3, "epochs", gen, torch.device("cpu"))
    epoch = torch.cat([sampler.next() for _ in range(3)])  # 3 minibatches of 3, the 10th image dropped
    assert epoch.unique().numel() == 9
    with_replacement = MinibatchSampler(4, 4, "replacement", gen, torch.device("cpu"))
    assert any(r.unique().numel() < 4 for r in (with_replacement.next() for _ in range(20)))


def test_weight_step_size_lr_is_cosine_annealed_by_default() -> None:
    w = WeightQuantizer(torch.randn(4, 3, 3, 3), 4, p=2.4)
    a = ActQuantizer(4, p=2.4)
    opts, scheds, _ = _optimizers([w], [a], CalibConfig(iters=10))
    for _ in range(10):
        for o in opts:
            o.step()  # no gradients: only keeps the scheduler's order check quiet
        for s in scheds:
            s.step()
    lrs = {id(g["params"][0]): g["lr"] for o in opts for g in o.param_groups}
    assert lrs[id(w.scale)] < 1e-12 and lrs[id(a.scale)] < 1e-12 and lrs[id(w.alpha)] == 1e-3
    opts, _, _ = _optimizers([w], [a], CalibConfig(iters=10, anneal_w_scale=False))
    assert any(p is w.scale for g in opts[0].param_groups for p in g["params"])  # with V, not annealed


@pytest.mark.slow
def test_compiled_step_matches_eager_on_cpu(float64) -> None:
    """The same math: equal to rounding in float64. Without QDrop's in-unit masks: inductor draws those from
    its own stream (measured: 2e-3 apart after 12 iterations with drop_prob 0.5, fallback_random or not)."""
    pytest.importorskip("torch._inductor")
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile needs a C++ compiler")
    torch.manual_seed(0)
    net = TinyNet(4)
    x = torch.randn(16, 3, 16, 16)
    cfg = CalibConfig(iters=12, batch_size=8, warmup=0.5, drop_prob=0.0)
    seen: list[dict] = []
    models = []
    for engine in ("eager", "compiled"):
        q = quantize(net, QuantConfig(w_bits=4, a_bits=4), x[:1])
        models.append(reconstruct_(q, x, replace(cfg, engine=engine), seed=2,
                                   progress=lambda s, i, n, m: seen.append(m)))
    with torch.no_grad():
        torch.testing.assert_close(models[1](x), models[0](x), atol=1e-9, rtol=1e-9)
    assert any("compile_s" in m and m["compile_s"] > 0 for m in seen)


def test_fused_engine_matches_eager_and_restores_the_batchnorms(float64, monkeypatch) -> None:
    """BatchNorm fused into the conv and channels_last activations: the same function, equal to rounding (float64,
    no QDrop: the fused engine draws its masks in channels_last order, another assignment of the same draws)."""
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("the fused engine is eager: nothing compiles"))
    torch.manual_seed(0)
    net = randomize_bn_(TinyNet(4))
    x = torch.randn(16, 3, 16, 16)
    cfg = CalibConfig(iters=12, batch_size=8, warmup=0.5, drop_prob=0.0)
    models = [reconstruct_(quantize(net, QuantConfig(w_bits=4, a_bits=4), x[:1]), x, replace(cfg, engine=e), seed=2)
              for e in ("eager", "fused")]
    with torch.no_grad():
        torch.testing.assert_close(models[1](x), models[0](x), atol=1e-9, rtol=1e-9)
    bns = [m for m in models[1].modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 4 and all(m.output_affine is None for m in models[1].modules() if is_quant_layer(m))


def _conv_bn(c: int, reuse: bool) -> nn.Module:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = QuantConv2d.from_float(nn.Conv2d(c, c, 3, padding=1), 4, None, p=2.4)
            self.bn = nn.BatchNorm2d(c)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y if reuse else torch.relu(self.bn(y))

    return randomize_bn_(Block())


def test_bn_fusion_applies_the_bn_and_is_undone() -> None:
    block, x = _conv_bn(4, reuse=False), torch.randn(2, 4, 8, 8)
    want = block(x)
    with bn_fused_into_convs(block, x) as pairs:
        assert pairs == [("conv", "bn")] and isinstance(block.bn, nn.Identity)
        torch.testing.assert_close(block(x), want, atol=1e-5, rtol=1e-5)
    assert isinstance(block.bn, nn.BatchNorm2d) and block.conv.output_affine is None
    torch.testing.assert_close(block(x), want, atol=0, rtol=0)


def test_bn_fusion_refused_where_the_conv_output_is_used_outside_its_bn(caplog) -> None:
    block, x = _conv_bn(4, reuse=True), torch.randn(2, 4, 8, 8)  # the trace sees conv -> bn only
    want = block(x)
    with bn_fused_into_convs(block, x) as pairs:
        assert pairs == [] and isinstance(block.bn, nn.BatchNorm2d)
        torch.testing.assert_close(block(x), want, atol=0, rtol=0)
    assert "not fusing BatchNorm" in caplog.text


def test_bn_fusion_skips_a_twin_with_its_own_forward() -> None:
    class PaddedTwin(QuantConv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)

    block, x = _conv_bn(4, reuse=False), torch.randn(2, 4, 8, 8)
    block.conv.__class__ = PaddedTwin  # would ignore output_affine: fusing would drop the BN
    with bn_fused_into_convs(block, x) as pairs:
        assert pairs == [] and isinstance(block.bn, nn.BatchNorm2d)


@pytest.mark.parametrize("draw", ["bytes", "uniform"])
def test_channels_last_masks_are_stored_channels_last(draw: str) -> None:
    gen = torch.Generator().manual_seed(0)
    keep = keep_mask((8, 16, 32, 32), 0.5, draw, generator=gen, channels_last=True)
    assert keep.shape == (8, 16, 32, 32) and is_channels_last(keep)
    assert abs(keep.float().mean().item() - 0.5) < 5 * (0.25 / keep.numel()) ** 0.5
    plain = keep_mask((8, 16, 32, 32), 0.5, draw, generator=gen.manual_seed(0))
    assert torch.equal(keep.permute(0, 2, 3, 1).reshape(-1), plain.reshape(-1))  # the same draws, in NHWC order


@pytest.mark.parametrize("beta", [20.0, 7.3, 2.0])
def test_fused_rounding_regularizer_matches_autograd(beta: float) -> None:
    w = WeightQuantizer(torch.randn(8, 4, 3, 3, dtype=torch.float64), 4, p=2.4)
    w.start_adaround(torch.randn(8, 4, 3, 3, dtype=torch.float64))
    with torch.no_grad():
        w.alpha[0, 0] = torch.tensor([30.0, -30.0, 0.0])  # clamped at 1 and at 0; h(0) = 0.5 exactly: u = 0
    value = w.regularizer(beta)
    ref = (1 - (2 * rectified_sigmoid(w.alpha) - 1).abs().pow(beta)).sum()
    torch.testing.assert_close(value, ref, atol=1e-12, rtol=0)
    got, = torch.autograd.grad(value, w.alpha)
    want, = torch.autograd.grad(ref, w.alpha)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert got.abs().max() > 0.1


def test_genie_under_bf16_autocast_runs_in_bf16_and_its_loss_stays_close() -> None:
    cfg = small_cfg(num_images=4, batch_size=4, genie_iters=3, swing=False)  # images of the 3rd forward: 2 steps
    fp32 = generate_genie(tiny_model(), SPEC, cfg, seed=0)[0].images
    bf16 = generate_genie(tiny_model(), SPEC, replace(cfg, precision="bf16"), seed=0)[0].images
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)  # the model ran in bf16
    model, x = tiny_model(), torch.randn(8, 3, SPEC.input_size, SPEC.input_size)
    losses = {}
    for enabled in (False, True):
        with capture_bn_inputs(model) as captured, torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            model(x)
            assert captured[0].dtype == (torch.bfloat16 if enabled else torch.float32)
            losses[enabled] = bn_statistics_losses(captured, bn_layers(model))
    assert losses[True].dtype == torch.float32
    torch.testing.assert_close(losses[True], losses[False], rtol=0.02, atol=0)


def test_tf32_is_a_cuda_setting_refused_elsewhere_before_any_work(tmp_path) -> None:
    import sadag
    from sadag.errors import ConfigError

    cfg = sadag.RunConfig(model="conftest:tiny_bn_model", preset="smoke", method="noise", out=str(tmp_path / "r"),
                          device="cpu", calib=CalibConfig(tf32=True))
    with pytest.raises(ConfigError, match=r"calib.tf32 \(--tf32\) selects TF32 on CUDA GPUs; this run is on cpu"):
        sadag.run(cfg)
    assert not (tmp_path / "r").exists()


def test_the_generator_runs_channels_last_on_cpu_with_the_same_math(float64, monkeypatch: pytest.MonkeyPatch) -> None:
    from sadag.generation import generator

    gen = GenieGenerator(8, latent_dim=16).train()
    z = torch.randn(5, 16)
    fast = gen(z)
    assert fast.is_contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(generator, "CHANNELS_LAST_ON_CPU", False)
    plain = gen(z)
    assert plain.is_contiguous()
    torch.testing.assert_close(fast, plain, atol=1e-12, rtol=0)


def test_the_bn_loss_reads_channels_last_activations(float64) -> None:
    model = tiny_model(dtype=torch.float64)
    layers = bn_layers(model)
    x = torch.randn(6, 3, 8, 8)
    losses = []
    for images in (x, x.contiguous(memory_format=torch.channels_last)):
        with capture_bn_inputs(model) as captured:
            model(images)
            losses.append(bn_statistics_losses(captured, layers, groups=2))
    torch.testing.assert_close(losses[0], losses[1], atol=1e-12, rtol=0)


def test_genie_images_leave_in_the_standard_layout() -> None:
    batches = generate_genie(tiny_model(), SPEC, small_cfg(num_images=4, batch_size=4, genie_iters=2), seed=0)
    assert batches[0].images.is_contiguous()


def _refinement(parallel: int, dtype: torch.dtype = torch.float32, num_images: int = 11, **kw):  # noqa: ANN202
    """fp and quantized stand-ins, Genie batches of 3 images (the last one of 2 at 11), and a config refining
    `parallel` at once."""
    fp = tiny_model(dtype=dtype)
    cfg = small_cfg(num_images=num_images, batch_size=3, genie_iters=2, refine_iters=6, plateau_patience=1,
                    refine_lr_z=0.05, refine_lr_g=0.01, refine_parallel=parallel, **kw)
    return fp, perturbed(fp), generate_genie(fp, SPEC, cfg, seed=3), cfg


@pytest.mark.parametrize("neighbor", ["released", "random"])
def test_parallel_refinement_without_diversity_matches_the_sequential_one(float64, neighbor: str) -> None:
    """lambda_div = 0 leaves nothing that couples the batches of a pass: the grouped generators, stacked latents,
    per-batch noise, BN losses and optimizers give each batch what it gets alone."""
    fp, q, batches, cfg = _refinement(3, torch.float64, lambda_div=0.0, neighbor=neighbor)
    passes = refine_sadag(fp, q, batches, SPEC, cfg, seed=1)
    alone = refine_sadag(fp, q, batches, SPEC, replace(cfg, refine_parallel=1), seed=1)
    assert not torch.allclose(alone, torch.cat([b.images for b in batches]))  # the refinement moved the images
    torch.testing.assert_close(passes, alone, atol=1e-9, rtol=0)


def test_diversity_of_a_pass_sees_its_other_batches() -> None:
    e, h = torch.eye(4, 6), torch.ones(4, 5)  # orthogonal samples: no similarity within a batch of 4
    assert diversity_losses(e, h, None, None, 0.0).tolist() == [0.0]
    twice = diversity_losses(torch.cat([e, e]), torch.cat([h, h]), None, None, 0.0, groups=2)
    torch.testing.assert_close(twice, torch.ones(2))  # each batch meets its copy in the other batch of the pass
    fp, q, batches, cfg = _refinement(2, lambda_gm=0.0, lambda_div=10.0)
    passes = refine_sadag(fp, q, batches, SPEC, cfg, seed=1)
    alone = refine_sadag(fp, q, batches, SPEC, replace(cfg, refine_parallel=1), seed=1)
    assert not torch.allclose(passes[:3], alone[:3], atol=1e-4)  # batch 0 now has batch 1 to differ from


def test_parallel_refinement_resumes_mid_pass_exactly(tmp_path) -> None:
    fp, q, batches, cfg = _refinement(2, num_images=12)
    full = refine_sadag(fp, q, batches, SPEC, cfg, seed=1)
    saved: dict = {}

    class Killed(Exception):
        pass

    def save(state: dict) -> None:
        torch.save(state, tmp_path / "state.pt")
        if state["iteration"] == 4 and state["batches"] == [2, 3]:
            raise Killed

    with pytest.raises(Killed):  # the second pass killed at step 4, the first one's batches saved
        refine_sadag(fp, q, batches, SPEC, cfg, seed=1, on_batch=saved.__setitem__,
                     checkpoints=RefineCheckpoints(save, every=2))
    assert sorted(saved) == [0, 1]
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    got: list[int] = []
    resumed = refine_sadag(fp, q, batches, SPEC, cfg, seed=1, done=saved, on_batch=lambda i, _x: got.append(i),
                           checkpoints=RefineCheckpoints(every=2, resume=state))
    assert got == [2, 3]
    assert torch.equal(resumed, full)
