"""The generation-method registry, and SADAG started from a saved Genie set and from a given warm-up model."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor

import sadag
from conftest import TINY, run_killed_at
from sadag import methods as registry
from sadag.cli import build_parser
from sadag.errors import ConfigError
from sadag.generation import GenerationContext, load_synthetic_set
from sadag.generation.common import batch_seed, cpu_generator


@dataclass
class UniformOptions:
    low: float = -1.0
    high: float = 1.0


@pytest.fixture
def uniform(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new method in a few lines: registering it is all the CLI, the checks and the pipeline need."""
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))

    @registry.register_method("uniform", config=UniformOptions, help="uniform noise")
    def generate(ctx: GenerationContext) -> Tensor:
        s, o = ctx.spec.input_size, ctx.options
        gen = cpu_generator(batch_seed(ctx.seed, 0, "uniform"))
        return torch.rand(ctx.gen.num_images, 3, s, s, generator=gen) * (o.high - o.low) + o.low


def tiny(out: Path, **kwargs) -> sadag.RunConfig:  # noqa: ANN003
    return sadag.RunConfig(model="conftest:tiny_bn_model", preset="smoke", out=str(out), **kwargs)


def test_a_registered_method_runs_end_to_end(tmp_path: Path, uniform: None, cli) -> None:
    report = sadag.run(tiny(tmp_path / "py", method="uniform", method_options={"high": 0.5}), export=False)
    assert report["method"] == "uniform" and report["num_calib"] == 32
    images, info = load_synthetic_set(tmp_path / "py" / "synthetic")
    assert -1.0 <= images.min() and images.max() <= 0.5 and info["meta"]["method"] == "uniform"
    assert build_parser().parse_args(["run", "--method", "uniform"]).method == "uniform"  # CLI choices
    code, _, err = cli(["run", *TINY, "--method", "uniform", "--out", tmp_path / "cli", "--no-export"])
    assert code == 0, err
    with pytest.raises(ConfigError, match=r"method_options: unknown keys middle; valid: high, low"):
        sadag.run(tiny(tmp_path / "bad", method="uniform", method_options={"middle": 0}))
    with pytest.raises(ConfigError, match=r"method_options.high: got 'big'; allowed: a number"):
        sadag.run(tiny(tmp_path / "bad", method="uniform", method_options={"high": "big"}))
    with pytest.raises(ConfigError, match="method 'noise' takes no options"):
        sadag.run(tiny(tmp_path / "bad", method="noise", method_options={"high": 1}))
    assert not (tmp_path / "bad").exists()


def test_registering_a_taken_name_is_refused(uniform: None) -> None:
    for name in ("genie", "real", "uniform"):
        with pytest.raises(ConfigError, match="already taken"):
            registry.register_method(name)


def test_batch_seeds_of_the_existing_stages_never_change() -> None:
    assert [batch_seed(0, 0, s) for s in ("genie-z", "genie-g", "swing", "zeroq", "sadag")] == [
        4324601099084218337, 5228546342681945855, 5418397405620618563, 5599536276867603174, 4167532537530091649]
    assert batch_seed(0, 0, "uniform") == batch_seed(0, 0, "uniform") != batch_seed(0, 1, "uniform")
    assert batch_seed(0, 0, "uniform") not in {batch_seed(0, 0, s) for s in ("genie-z", "genie-g", "swing")}


GEN = sadag.GenConfig(genie_iters=3, warmup_calib_iters=2, refine_iters=2)
GENIE_GEN = sadag.GenConfig(genie_iters=3)  # what method genie reads of GEN (it refuses the rest)


def test_sadag_continues_from_a_genie_set_and_a_warmup_model_exactly(tmp_path: Path) -> None:
    calib = sadag.CalibConfig(iters=2)
    fresh = sadag.run(tiny(tmp_path / "fresh", method="sadag", gen=GEN, calib=calib), export=False)
    genie_set = sadag.generate_set(tiny(tmp_path / "genie", method="genie", gen=GENIE_GEN, calib=calib))
    gen = sadag.GenConfig(genie_iters=3, warmup_calib_iters=2, refine_iters=2, genie_set=str(genie_set))
    from_set = sadag.run(tiny(tmp_path / "from_set", method="sadag", gen=gen, calib=calib), export=False)
    gen.warmup_model = str(tmp_path / "fresh" / "warmup.safetensors")
    from_both = sadag.run(tiny(tmp_path / "from_both", method="sadag", gen=gen, calib=calib), export=False)
    reference = load_synthetic_set(tmp_path / "fresh" / "synthetic")[0]
    for name, report in (("from_set", from_set), ("from_both", from_both)):
        assert torch.equal(load_synthetic_set(tmp_path / name / "synthetic")[0], reference), name
        assert "generate" not in report["seconds"] and "refine" in report["seconds"]
    assert "warmup_calibrate" in fresh["seconds"] and "warmup_calibrate" not in from_both["seconds"]


def test_a_genie_set_or_warmup_model_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    genie_set = sadag.generate_set(tiny(tmp_path / "genie", method="genie", gen=GENIE_GEN))
    noise_set = sadag.generate_set(tiny(tmp_path / "noise", method="noise"))
    cases = [
        (dict(genie_set=str(noise_set)), "holds no Genie-D batches"),
        (dict(genie_set=str(genie_set), num_images=16), "has batches of [16, 16] images, this run asks for [16]"),
        (dict(genie_set=str(genie_set), latent_dim=8), "latents of size 256, gen.latent_dim is 8"),
        # the run would record 300 Genie-D steps that never ran
        (dict(genie_set=str(genie_set), genie_iters=300), "other Genie-D settings (gen.genie_iters 3 in the set, "
                                                           "300 in this run)"),
    ]
    for i, (fields, message) in enumerate(cases):
        gen = sadag.GenConfig(**{"genie_iters": 3, "warmup_calib_iters": 2, "refine_iters": 2, **fields})
        with pytest.raises(ConfigError, match=re.escape(message)):
            sadag.run(tiny(tmp_path / f"r{i}", method="sadag", gen=gen), export=False)
    # Genie-D's latents and generators are seeded from the run's seed: seed 5 would claim batches it never made
    gen = sadag.GenConfig(genie_iters=3, warmup_calib_iters=2, refine_iters=2, genie_set=str(genie_set))
    with pytest.raises(ConfigError, match=re.escape("other Genie-D settings (seed 0 in the set, 5 in this run)")):
        sadag.run(tiny(tmp_path / "seed", method="sadag", seed=5, gen=gen), export=False)
    q = sadag.run(tiny(tmp_path / "w2", method="noise", bits="2/4", calib=sadag.CalibConfig(iters=1)))
    assert q["w_bits"] == 2
    gen = sadag.GenConfig(genie_iters=3, genie_set=str(genie_set), warmup_model=str(tmp_path / "w2" /
                                                                                   "quantized.safetensors"))
    with pytest.raises(ConfigError, match="is 'conftest:tiny_bn_model' at W/A 2/4; this run needs "
                                          "'conftest:tiny_bn_model' at 4/4"):
        sadag.run(tiny(tmp_path / "wrong_bits", method="sadag", gen=gen), export=False)


def test_genie_from_a_saved_set_reuses_it_and_only_adds_the_lowpass(tmp_path: Path) -> None:
    from sadag.generation.lowpass import apply_lowpass

    genie_set = sadag.generate_set(tiny(tmp_path / "genie", method="genie", gen=GENIE_GEN))
    gen = sadag.GenConfig(genie_iters=3, genie_set=str(genie_set), lowpass=4.0)
    filtered = sadag.generate_set(tiny(tmp_path / "lowpass", method="genie", gen=gen))
    spec = sadag.load_model("conftest:tiny_bn_model")[1]
    original = load_synthetic_set(genie_set)[0]
    again = load_synthetic_set(filtered)[0]
    assert not torch.equal(again, original)
    assert torch.allclose(again, apply_lowpass(original, spec, 4.0), atol=1e-6)
    # the filtered set is not Genie-D's output any more: reused as a Genie set it would be filtered twice
    # (genie) or refined from images its generators do not make (sadag)
    for method, steps in (("genie", {}), ("sadag", {"warmup_calib_iters": 2, "refine_iters": 2})):
        gen = sadag.GenConfig(genie_iters=3, genie_set=str(filtered), **steps)  # what each method reads
        with pytest.raises(ConfigError, match="was low-pass filtered when it was made"):
            sadag.run(tiny(tmp_path / f"twice_{method}", method=method, gen=gen), export=False)


def test_reports_name_their_images_by_digest_and_a_resume_refuses_an_input_file_made_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sadag.generation import images_digest
    from sadag.rundir import RunDirError

    calib = sadag.CalibConfig(iters=2)
    genie = sadag.run(tiny(tmp_path / "genie", method="genie", gen=GENIE_GEN, calib=calib), export=False)
    genie_set = tmp_path / "genie" / "synthetic"
    assert genie["calib_digest"] == images_digest(load_synthetic_set(genie_set)[0]) and "genie_set_digest" not in genie
    gen = sadag.GenConfig(genie_iters=3, genie_set=str(genie_set), lowpass=4.0)
    filtered = sadag.run(tiny(tmp_path / "lowpass", method="genie", gen=gen, calib=calib), export=False)
    assert filtered["genie_set_digest"] == genie["calib_digest"] != filtered["calib_digest"]  # started from it
    # killed mid-calibration, then the file each reads again on resume is made again
    warmup = tmp_path / "w" / "quantized.safetensors"
    sadag.run(tiny(warmup.parent, method="noise", calib=calib))
    kept_set = sadag.generate_set(tiny(tmp_path / "kept", method="genie", gen=GENIE_GEN, seed=2))  # not made again
    with_warmup = sadag.GenConfig(genie_iters=3, refine_iters=2, genie_set=str(kept_set), warmup_model=str(warmup))
    victims = {"genie_set": tiny(tmp_path / "v1", method="genie", gen=gen, calib=calib),
               "calib_data": tiny(tmp_path / "v2", calib_data=str(genie_set), calib=calib),
               "warmup_model": tiny(tmp_path / "v3", method="sadag", gen=with_warmup, calib=calib, seed=2)}
    for cfg in victims.values():
        run_killed_at(monkeypatch, "calib.pt", cfg)
    sadag.run(tiny(tmp_path / "genie", method="genie", gen=GENIE_GEN, calib=calib, seed=1), force=True, export=False)
    sadag.run(tiny(warmup.parent, method="noise", calib=calib, seed=1), force=True)
    for name, cfg in victims.items():
        with pytest.raises(RunDirError, match=rf"{name} \(--[a-z-]+\) .* is not the one this run started from"):
            sadag.run(cfg, resume=True, export=False)
    import conftest

    made = conftest.tiny_bn_model

    def other_weights():  # noqa: ANN202
        model, spec = made()
        with torch.no_grad():
            next(model.parameters()).mul_(1.01)
        return model, spec

    monkeypatch.setattr(conftest, "tiny_bn_model", other_weights)  # the same model name, other weights
    with pytest.raises(RunDirError, match="the model 'conftest:tiny_bn_model' is not the one this run"):
        sadag.run(victims["genie_set"], resume=True, export=False)


def test_a_resume_refuses_an_evaluation_folder_that_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import write_image_folder
    from sadag.rundir import RunDirError

    folder = tmp_path / "eval"
    write_image_folder(folder, {f"c{k}": 2 for k in range(10)}, size=(16, 16))
    cfg = tiny(tmp_path / "run", method="noise", eval_data=str(folder), calib=sadag.CalibConfig(iters=2))
    run_killed_at(monkeypatch, "calib.pt", cfg)  # the FP accuracy on the folder is checkpointed by now
    write_image_folder(folder, {"c0": 3}, size=(16, 16))  # one more image
    with pytest.raises(RunDirError, match=r"eval_data \(--eval-data\) .* is not the one this run started from"):
        sadag.run(cfg, resume=True, export=False)
