"""Settings: one resolution order for every entry point, one place that checks them, config.yaml loads back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import TINY
from sadag import CalibConfig, GenConfig, QuantConfig, RunConfig, apply_preset
from sadag.cli import build_parser, config_from_args
from sadag.config import (
    METHOD_GEN_READS,
    PRESETS,
    check_unused_settings,
    dump_yaml,
    explicit_fields,
    load_config,
    schema_fields,
    to_dict,
)
from sadag.errors import ConfigError
from sadag.methods import METHODS, GenerationMethod, method_names

FAST_GENIE_ITERS = PRESETS["fast"]["gen"]["genie_iters"]


def from_cli(*argv: str) -> RunConfig:
    return apply_preset(config_from_args(build_parser().parse_args(["run", "--out", "x", *argv])))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


# --- resolution order: defaults < preset < file < flags < Python ---------------------------------

def test_the_fast_preset_moves_genie_iters_so_the_tests_below_can_see_it_arrive() -> None:
    assert FAST_GENIE_ITERS != GenConfig().genie_iters


def test_python_explicit_sections_beat_the_preset() -> None:
    cfg = apply_preset(RunConfig(preset="fast", quant=QuantConfig(w_bits=2), calib=CalibConfig(iters=500),
                                 gen=GenConfig(genie_iters=7)))
    assert (cfg.quant.w_bits, cfg.quant.a_bits, cfg.calib.iters, cfg.gen.genie_iters) == (2, 4, 500, 7)
    assert cfg.gen.num_images == 256  # not set: the preset's


def test_python_explicit_value_equal_to_the_default_still_wins() -> None:
    cfg = apply_preset(RunConfig(preset="fast", calib=CalibConfig(iters=20_000), gen=GenConfig(num_images=1024)))
    assert cfg.calib.iters == 20_000 and cfg.gen.num_images == 1024 and cfg.gen.genie_iters == FAST_GENIE_ITERS


def test_python_assignment_is_explicit_and_beats_a_loaded_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "preset: fast\ncalib: {iters: 77}\n"))
    cfg.calib.iters = 5
    cfg.quant.w_bits = 3
    cfg.gen.refine_iters = 200  # equal to the preset's value, still explicit
    assert {"iters"} <= explicit_fields(cfg.calib) and "refine_iters" in explicit_fields(cfg.gen)
    out = apply_preset(cfg)
    assert (out.calib.iters, out.quant.w_bits, out.gen.refine_iters) == (5, 3, 200)


def test_yaml_sections_beat_the_preset(tmp_path: Path) -> None:
    path = write(tmp_path, "preset: fast\nquant: {w_bits: 2}\ncalib: {iters: 20000}\ngen: {num_images: 1024}\n")
    for cfg in (apply_preset(load_config(path)), from_cli("--config", str(path))):
        assert (cfg.quant.w_bits, cfg.calib.iters, cfg.gen.num_images) == (2, 20_000, 1024)
        assert cfg.gen.genie_iters == FAST_GENIE_ITERS  # the preset's


def test_cli_flags_beat_the_preset_per_section() -> None:
    cfg = from_cli("--preset", "fast", "--bits", "2/4", "--calib-iters", "20000", "--num-images", "1024")
    got = (cfg.quant.w_bits, cfg.calib.iters, cfg.gen.num_images, cfg.gen.genie_iters)
    assert got == (2, 20_000, 1024, FAST_GENIE_ITERS)


def test_cli_flags_beat_the_file_per_section(tmp_path: Path) -> None:
    path = write(tmp_path, "preset: fast\nquant: {w_bits: 2}\ncalib: {iters: 77, batch_size: 8}\n"
                           "gen: {rho: 0.5, lr_z: 1e-3}\n")
    cfg = from_cli("--config", str(path), "--bits", "3/3", "--calib-iters", "88", "--rho", "0.25")
    assert (cfg.quant.w_bits, cfg.quant.a_bits) == (3, 3)
    assert (cfg.calib.iters, cfg.calib.batch_size) == (88, 8)  # the flag, and the file's other key
    assert (cfg.gen.rho, cfg.gen.lr_z) == (0.25, 1e-3)  # 1e-3 is a number, not YAML 1.1's string
    # and a file's bits lose to a flag's quant section the same way
    cfg = from_cli("--config", str(write(tmp_path, "bits: 2/4\n")), "--bits", "4/fp")
    assert (cfg.quant.w_bits, cfg.quant.a_bits) == (4, None)


def test_bits_and_quant_bits_are_one_setting() -> None:
    assert apply_preset(RunConfig(bits="2/4")).quant.w_bits == 2
    assert apply_preset(RunConfig(bits="2/4", quant=QuantConfig(w_bits=2))).quant.a_bits == 4
    with pytest.raises(ConfigError, match=r"bits '2/4' contradicts quant.w_bits=4"):
        apply_preset(RunConfig(bits="2/4", quant=QuantConfig(w_bits=4)))
    with pytest.raises(ConfigError, match="contradicts quant.a_bits"):
        load_config_text("bits: 4/4\nquant: {a_bits: 8}\n")


def load_config_text(text: str) -> RunConfig:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return apply_preset(load_config(write(Path(d), text)))


def test_resolution_is_idempotent_and_keeps_explicitness() -> None:
    cfg = apply_preset(RunConfig(preset="smoke", calib=CalibConfig(iters=3)))
    assert apply_preset(cfg) == cfg
    cfg.preset = "fast"  # the preset's values were not explicit: a new preset replaces them
    again = apply_preset(cfg)
    assert again.calib.iters == 3 and again.calib.batch_size == 32 and again.gen.num_images == 256


# --- checks: one place, before anything is written -----------------------------------------------

@pytest.mark.parametrize(("flags", "field", "allowed"), [
    (["--num-calib", "-4990"], "num_calib (--num-calib)", ">= 1"),
    (["--num-calib", "0"], "num_calib (--num-calib)", ">= 1"),
    (["--eval-limit", "-99"], "eval_limit (--eval-limit)", ">= 1"),
    (["--eval-limit", "0"], "eval_limit (--eval-limit)", ">= 1"),
    (["--eval-batch-size", "0"], "eval_batch_size (--eval-batch-size)", ">= 1"),
    (["--calib-batch-size", "0"], "calib.batch_size (--calib-batch-size)", ">= 1"),
    (["--gen-batch-size", "0"], "gen.batch_size (--gen-batch-size)", ">= 1"),
    (["--calib-iters", "-1"], "calib.iters (--calib-iters)", ">= 0"),
    (["--threads", "-1"], "threads (--threads)", ">= 1"),
    (["--device", "tpu"], "device (--device)", "auto, cpu, cuda, cuda:N (N a GPU index), mps"),
    (["--seed", "-3"], "seed (--seed)", ">= 0"),
    (["--seed", "4294967296"], "seed (--seed)", "<= 4294967295"),  # would make seed 0's images
    (["--lr-z", "nan"], "gen.lr_z (--lr-z): got nan", "a finite number"),  # NaN fails every bound check
    (["--lr-z", "inf"], "gen.lr_z (--lr-z): got inf", "a finite number"),
    (["--device", "cpu\n"], "device (--device)", "auto, cpu, cuda"),  # $ also matches before a newline
    (["--eval-limit", "5"], "eval_limit (--eval-limit) 5", "this run has none"),
    # settings this run would not read are refused, not dropped
    (["--num-calib", "8"], "num_calib (--num-calib) 8", "this run has none"),
    (["--genie-set", "S"], "gen.genie_set (--genie-set)", "this run uses method 'noise': drop it"),
    (["--warmup-model", "W"], "gen.warmup_model (--warmup-model)", "read by method sadag"),
    # the minibatch is never silently shrunk to the set: refused before anything is generated
    (["--num-images", "8"], "calib.batch_size (--calib-batch-size)", "at most 8 or calibrate on more images"),
    (["--method", "real", "--calib-data", "set", "--num-calib", "8", "--calib-batch-size", "9"],
     "calib.batch_size (--calib-batch-size)", "more than the 8 calibration images of num_calib (--num-calib)"),
    # with --calib-data no image is generated: the method and explicit generation settings would be dropped
    (["--calib-data", "set"], "method (--method) 'noise' generates calibration images", "drop --method"),
    (["--method", "zeroq", "--calib-data", "set"], "method (--method) 'zeroq'", "drop --calib-data to generate"),
    (["--method", "real", "--calib-data", "set", "--lowpass", "2"], "gen.lowpass (--lowpass) 2.0",
     "so none are generated: drop it (to filter a saved Genie set: --method genie --genie-set DIR"),
    (["--method", "sadag", "--calib-data", "set", "--gen-iters", "7"], "gen.genie_iters (--gen-iters) 7",
     "so none are generated"),
    # found before the run directory, so the corrected command can use the same --out
    (["--method", "real"], "method real samples real images", "give --calib-data DIR"),
    (["--method", "genie", "--units", "nope"], "unknown unit module names: nope", "valid names include"),
    (["--method", "genie", "--bn-scope", "set", "--num-images", "24"], "gen.bn_scope 'set' optimizes every batch",
     "gen.num_images 24 is not a multiple of gen.batch_size 16"),
    (["--method", "sadag", "--bn-scope", "set", "--parallel-batches", "1"], "gen.bn_scope 'set' optimizes all 2",
     "would split them: leave it 0"),
    # an empty path is not "not given": it would generate, run Genie-D, skip the evaluation
    (["--calib-data", ""], "calib_data (--calib-data): got ''", "a non-empty string, or leave it out"),
    (["--genie-set", ""], "gen.genie_set (--genie-set): got ''", "a non-empty string"),
    (["--eval-data", ""], "eval_data (--eval-data): got ''", "a non-empty string"),
    (["--weights", ""], "weights (--weights): got ''", "a non-empty string"),
])
def test_bad_flag_values_are_refused_before_the_run_directory(tmp_path: Path, cli, flags, field, allowed) -> None:
    out = tmp_path / "run"
    code, _, err = cli(["run", *TINY, "--method", "noise", "--out", out, *flags])
    assert code == 2 and field in err and allowed in err, err
    assert not out.exists()


@pytest.mark.parametrize("flags", [["--calib-data", "G", "--eval-data", "G"], ["--num-calib", "8"],
                                   ["--eval-limit", "3"], ["--class-index", "c.txt"]])
def test_generate_refuses_what_only_calibration_and_evaluation_read(tmp_path: Path, cli, flags: list[str]) -> None:
    out = tmp_path / "set"
    code, _, err = cli(["generate", *TINY, "--method", "noise", "--out", out, *flags])
    assert code == 2 and f"({flags[0]})" in err and "generating a set (sadag generate) neither calibrates" in err, err
    assert not out.exists()


def test_generation_settings_equal_to_the_preset_pass_with_calib_data(tmp_path: Path) -> None:
    # a run's config.yaml gives every field explicitly: a --calib-data run's must load back and rerun
    cfg = apply_preset(RunConfig(calib_data="set", preset="smoke", method="real", out="x"))
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(to_dict(cfg)))
    check_unused_settings(apply_preset(load_config(path)))
    check_unused_settings(apply_preset(RunConfig(calib_data="set", preset="smoke", gen=GenConfig(genie_iters=10))))
    with pytest.raises(ConfigError, match=r"gen.genie_iters \(--gen-iters\) 11 applies to generated images"):
        check_unused_settings(apply_preset(RunConfig(calib_data="set", preset="smoke", gen=GenConfig(genie_iters=11))))


@pytest.mark.parametrize(("method", "flags", "named"), [
    ("zeroq", ["--gen-precision", "bf16", "--bn-scope", "set", "--refine-iters", "7", "--lambda-gm", "0.5"],
     "gen.precision (--gen-precision) 'bf16' (read by genie, sadag); gen.bn_scope (--bn-scope) 'set' (read by "
     "genie, sadag); gen.refine_iters (--refine-iters) 7 (read by sadag); gen.lambda_gm (--lambda-gm) 0.5 (read by "
     "sadag), so they would change nothing: drop them"),
    ("noise", ["--gen-batch-size", "8"], "gen.batch_size (--gen-batch-size) 8 (read by zeroq, genie, sadag), so it"),
    ("genie", ["--warmup-calib-iters", "3", "--zeroq-iters", "9"], "gen.warmup_calib_iters (--warmup-calib-iters) 3 "
     "(read by sadag); gen.zeroq_iters (--zeroq-iters) 9 (read by zeroq)"),
    ("sadag", ["--zeroq-iters", "9"], "gen.zeroq_iters (--zeroq-iters) 9 (read by zeroq)"),
])
@pytest.mark.parametrize("command", ["run", "generate"])
def test_generation_settings_the_method_does_not_read_are_refused(tmp_path: Path, cli, command: str, method: str,
                                                                 flags: list[str], named: str) -> None:
    out = tmp_path / "run"
    code, _, err = cli([command, *TINY, "--method", method, "--out", out, *flags])
    assert code == 2 and f"method {method!r} does not read {named}" in err, err
    assert not out.exists()


def test_only_explicit_generation_settings_other_than_the_presets_are_refused(tmp_path: Path) -> None:
    # the presets set Genie-D and SADAG budgets for every method; a run's config.yaml gives every field explicitly,
    # and loads back with another method
    for preset in PRESETS:
        check_unused_settings(apply_preset(RunConfig(method="zeroq", preset=preset)))
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(to_dict(apply_preset(RunConfig(method="sadag", preset="smoke", out="x")))))
    for method in ("noise", "zeroq", "genie"):
        check_unused_settings(apply_preset(load_config(path, method=method)), "generate")
    check_unused_settings(apply_preset(RunConfig(method="zeroq", preset="smoke", gen=GenConfig(refine_iters=5))))
    with pytest.raises(ConfigError, match=r"method 'zeroq' does not read gen.refine_iters \(--refine-iters\) 6"):
        check_unused_settings(apply_preset(RunConfig(method="zeroq", preset="smoke", gen=GenConfig(refine_iters=6))))


def test_a_method_registered_elsewhere_is_not_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """sadag cannot know which gen settings another method reads."""
    monkeypatch.setitem(METHODS, "mine", GenerationMethod("mine", lambda ctx: None))
    check_unused_settings(apply_preset(RunConfig(method="mine", preset="smoke", gen=GenConfig(refine_iters=6))))


def test_every_generation_setting_is_read_by_some_method() -> None:
    read = {name for reads in METHOD_GEN_READS.values() for name in reads}
    assert read == {f.name for f, _ in schema_fields(GenConfig)}
    assert set(METHOD_GEN_READS) <= set(method_names())


@pytest.mark.parametrize(("method", "refused"), [("noise", False), ("sadag", True)])
def test_generate_refuses_a_small_set_only_where_it_calibrates(tmp_path: Path, cli, method: str,
                                                               refused: bool) -> None:
    out = tmp_path / "set"  # 8 images, the smoke preset's minibatch of 16: only SADAG's warm-up calibrates
    code, _, err = cli(["generate", *TINY, "--method", method, "--num-images", "8", "--out", out])
    assert (code, "calib.batch_size (--calib-batch-size): got 16" in err, out.exists()) == (
        (2, True, False) if refused else (0, False, True)), err


@pytest.mark.parametrize(("text", "message"), [
    ("calib: {iters: 1.5}\n", "calib.iters (--calib-iters): got 1.5; allowed: an integer"),
    ("gen: {num_images: many}\n", "gen.num_images (--num-images): got 'many'; allowed: an integer"),
    ("calib: {lr_round: fast}\n", "calib.lr_round: got 'fast'; allowed: a number"),
    ("quant: [1, 2]\n", "quant: got [1, 2]; allowed: a mapping of QuantConfig fields"),
    ("calib: {itres: 5}\n", "calib: unknown keys itres; valid:"),
    ("modle: resnet20_cifar10\n", "config: unknown keys modle"),
    ("- 1\n- 2\n", "must hold a mapping of config keys"),
    ("calib: {beta: [1, 2, 3]}\n", "calib.beta: got [1, 2, 3]; allowed: a list of a number (exactly 2)"),
    ("gen: {neighbor: nearest}\n",
     "gen.neighbor (--neighbor): got 'nearest'; allowed: one of released, random, adversarial"),
    ("method: magic\n", "method (--method): got 'magic'; allowed: noise, zeroq, genie, sadag, real"),
    ("calib: {drop_prob: 1.5}\n", "calib.drop_prob: got 1.5; allowed: a number >= 0.0 and <= 1.0"),
    ("quant: {w_bits: true}\n", "quant.w_bits: got True; allowed: an integer"),
    ("1: a\nfoo: b\n", "config: unknown keys 1, foo"),  # keys of two types
    # p = 0 scores every clip alike; an export of it would be refused by `sadag evaluate --quantized`
    ("quant: {clip_search_p: 0}\n", "quant.clip_search_p: got 0.0; allowed: a number > 0.0"),
    # NaN would quantize every weight to zero (no clip error compares lower than NaN)
    ("quant: {clip_search_p: .nan}\n", "quant.clip_search_p: got nan; allowed: a finite number"),
    ("calib: {drop_prob: .nan}\n", "calib.drop_prob: got nan; allowed: a finite number"),
    ("calib: {lr_round: .inf}\n", "calib.lr_round: got inf; allowed: a finite number"),
    # each element of a pair too: a NaN beta failed at the first loss, a negative one inverted AdaRound's push
    ("calib: {beta: [.nan, 2.0]}\n", "calib.beta: got (nan, 2.0); allowed: finite numbers"),
    ("calib: {beta: [20, .inf]}\n", "calib.beta: got (20.0, inf); allowed: finite numbers"),
    ("calib: {beta: [-2.0, -1.0]}\n", "calib.beta: got (-2.0, -1.0); allowed: numbers > 0.0"),
    ("calib: {beta: [20, 0]}\n", "calib.beta: got (20.0, 0.0); allowed: numbers > 0.0"),
    # PyYAML would keep the second block only: W4 A8 from a file that also says w_bits 2
    ("quant: {w_bits: 2}\nquant: {a_bits: 8}\n", "key 'quant' appears twice in one mapping (line 2); keep one"),
    ("calib: {iters: 2, iters: 3}\n", "key 'iters' appears twice"),
])
def test_bad_config_files_are_refused_before_the_run_directory(tmp_path: Path, cli, text, message) -> None:
    out = tmp_path / "run"
    code, _, err = cli(["run", *TINY, "--out", out, "--config", write(tmp_path, text)])
    assert code == 2 and message in err, err
    assert not out.exists()


def test_calibrate_without_images_is_refused_from_flags_or_file(tmp_path: Path, cli) -> None:
    config = write(tmp_path, "calib: {iters: 2}\n")  # a file, but no calib_data in it
    for extra in ([], ["--config", config]):
        code, _, err = cli(["calibrate", *TINY, "--out", tmp_path / "run", *extra])
        assert code == 2 and "calibrate needs --calib-data" in err, err
    assert not (tmp_path / "run").exists()


def test_a_binary_file_given_as_config_is_refused(tmp_path: Path, cli) -> None:
    weights = tmp_path / "weights.th"
    weights.write_bytes(b"PK\x03\x04\xff\xfe binary")
    code, _, err = cli(["run", *TINY, "--out", tmp_path / "run", "--config", weights])
    assert code == 2 and "is not a text file" in err and "give a YAML config" in err, err
    assert not (tmp_path / "run").exists()


def test_a_yaml_nested_too_deeply_is_refused_not_a_traceback(tmp_path: Path, cli) -> None:
    path = write(tmp_path, "a: " + "[" * 3000 + "]" * 3000 + "\n")
    code, _, err = cli(["run", *TINY, "--config", path, "--out", tmp_path / "run"])
    assert code == 2 and f"{path} nests lists or mappings too deeply" in err, err


def test_yaml_alias_bomb_is_refused_not_expanded(tmp_path: Path, cli) -> None:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = write(tmp_path, "\n".join(lines) + "\n")
    assert bomb.stat().st_size < 600  # expanded: 9**9 strings
    out = tmp_path / "run"
    code, _, err = cli(["run", *TINY, "--out", out, "--config", bomb])
    assert code == 2 and "anchors and aliases" in err and "line 1" in err
    assert not out.exists()


def test_sections_checked_standalone() -> None:
    with pytest.raises(ConfigError, match=r"batch_size \(--calib-batch-size\): got 0; allowed: an integer >= 1"):
        CalibConfig(batch_size=0).validate()
    with pytest.raises(ConfigError, match=r"warmup: got 1.0; allowed: a number >= 0.0 and < 1.0"):
        CalibConfig(warmup=1.0).validate()


# --- what a file may not do ------------------------------------------------------------------------

def test_a_file_naming_code_needs_the_callers_opt_in(tmp_path: Path) -> None:
    path = write(tmp_path, "model: conftest:tiny_bn_model\n")
    with pytest.raises(ConfigError, match="--allow-import"):
        from_cli("--config", str(path))
    with pytest.raises(ConfigError, match="allow_import=True"):
        load_config(path)
    assert from_cli("--config", str(path), "--allow-import").model == "conftest:tiny_bn_model"
    assert load_config(path, allow_import=True).model == "conftest:tiny_bn_model"
    # typed on the command line or passed in Python, the same string is the user's own choice
    assert from_cli("--config", str(path), "--model", "conftest:no_bn_model").model == "conftest:no_bn_model"
    assert from_cli("--model", "conftest:tiny_bn_model").model == "conftest:tiny_bn_model"


@pytest.mark.parametrize("key", ["allow_import", "trust_checkpoint"])
def test_a_file_cannot_grant_trust(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError, match=f"sets {key}: a file cannot grant trust"):
        from_cli("--config", str(write(tmp_path, f"{key}: true\n")))


def test_trust_checkpoint_flag_reaches_the_config() -> None:
    assert from_cli("--trust-checkpoint").trust_checkpoint is True and from_cli().trust_checkpoint is False


@pytest.mark.parametrize("cls", [RunConfig, QuantConfig, CalibConfig, GenConfig])
def test_every_flag_of_a_bool_field_is_a_const_flag(cls: type) -> None:
    # a flag taking a value would apply bool() to its text: `--tf32 false` turned TF32 on
    for f, hint in schema_fields(cls):
        if hint is bool and f.metadata.get("flag"):
            assert "const" in f.metadata, f"{cls.__name__}.{f.name} ({f.metadata['flag']})"


def test_tf32_is_a_switch_without_a_value() -> None:
    assert from_cli("--tf32").calib.tf32 is True and from_cli().calib.tf32 is False
    with pytest.raises(SystemExit):  # argparse: unrecognized arguments: false
        from_cli("--tf32", "false")


# --- the saved config loads back ------------------------------------------------------------------

def test_saved_config_loads_back_to_the_same_config(tmp_path: Path) -> None:
    # strings that YAML 1.2 reads as numbers ("1e3") are quoted, or the file would not load back
    cfg = apply_preset(RunConfig(model="resnet56_cifar10", bits="3/fp", preset="smoke", seed=4, eval_limit=3, out="x",
                                 calib_data="2.5", eval_data="-1.5e-2",
                                 quant=QuantConfig(units=["layer1.0", "layer2.0"], fold_bn=True),
                                 calib=CalibConfig(beta=(10, 1), lr_round=2e-3), gen=GenConfig(neighbor="adversarial")))
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(to_dict(cfg)))
    assert from_cli("--config", str(path)) == cfg
    assert apply_preset(load_config(path)) == cfg
    # and it wins over a different preset on the command line: every value in it is explicit
    assert from_cli("--config", str(path), "--preset", "paper").calib.iters == cfg.calib.iters


def test_run_writes_a_config_that_reruns_identically(tmp_path: Path, cli) -> None:
    out = tmp_path / "run"
    code, _, err = cli(["run", *TINY, "--method", "noise", "--out", out, "--calib-iters", "2", "--no-export"])
    assert code == 0, err
    saved = out / "config.yaml"
    first = from_cli("--config", str(saved), "--allow-import")
    again = tmp_path / "again"
    code, _, err = cli(["run", "--config", saved, "--allow-import", "--out", again, "--no-export"])
    assert code == 0, err
    assert (again / "config.yaml").read_text() == saved.read_text().replace(str(out), str(again))
    assert first.calib.iters == 2 and first.model == "conftest:tiny_bn_model"


def test_a_gpu_index_past_the_machine_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from sadag.pipeline import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ConfigError, match=r"'cuda:1' requested but this machine has 1 CUDA device\(s\), cuda:0 to "
                                          r"cuda:0"):
        resolve_device("cuda:1")
