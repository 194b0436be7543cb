"""Run directories: never mixed (fingerprint), never clobbered (marker, lock), checkpoints are plain data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sadag
from conftest import TINY, run_killed_at
from sadag.config import apply_preset, result_settings
from sadag.errors import ConfigError
from sadag.generation import builtin
from sadag.rundir import LOCK, MARKER, RunDir, RunDirError, check_plain


def tiny(out: Path, **kwargs) -> sadag.RunConfig:  # noqa: ANN003
    settings = {"model": "conftest:tiny_bn_model", "method": "noise", "preset": "smoke",
                "calib": sadag.CalibConfig(iters=2), **kwargs}
    return sadag.RunConfig(out=str(out), **settings)


def run(cfg: sadag.RunConfig, **kwargs) -> dict:  # noqa: ANN003
    return sadag.run(cfg, export=False, **kwargs)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != LOCK}


@pytest.fixture
def finished(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    run(tiny(out))
    return out


def test_a_run_carries_its_marker_and_fingerprint(finished: Path) -> None:
    marker = json.loads((finished / MARKER).read_text())
    assert marker["settings"] == result_settings(apply_preset(tiny(finished)), "cpu")
    assert marker["settings"]["device"] == "cpu"  # what "auto" resolved to, not what was typed
    assert marker["settings"]["calib.iters"] == 2 and "out" not in marker["settings"]
    assert "threads" not in marker["settings"] and "eval_batch_size" not in marker["settings"]


def test_the_identity_tells_one_run_from_another_of_the_same_settings(tmp_path: Path) -> None:
    """What torchrun's ranks compare: a folder of the same name on each machine is not one run."""
    settings = result_settings(apply_preset(tiny(tmp_path)), "cpu")
    first, second = RunDir(tmp_path / "a", settings), RunDir(tmp_path / "b", settings)
    try:
        view = RunDir(tmp_path / "a", settings, read_only=True)
        assert view.identity() == first.identity() != second.identity()
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize(("change", "named"), [
    ({"seed": 1}, "seed: 0 in the run, 1 now"),
    ({"bits": "2/4"}, "quant.w_bits: 4 in the run, 2 now"),
    ({"method": "zeroq"}, "method: 'noise' in the run, 'zeroq' now"),
    ({"gen": sadag.GenConfig(num_images=16)}, "gen.num_images: 32 in the run, 16 now"),
    ({"model": "conftest:no_bn_model"}, "model: 'conftest:tiny_bn_model' in the run, 'conftest:no_bn_model' now"),
])
def test_resume_with_other_settings_is_refused_naming_them(finished: Path, change: dict, named: str) -> None:
    before = snapshot(finished)
    with pytest.raises(RunDirError, match="cannot resume") as err:
        run(tiny(finished, **change), resume=True)
    assert named in str(err.value)
    assert snapshot(finished) == before  # config.yaml, report, state: nothing rewritten


def test_resume_may_change_what_cannot_change_the_result(finished: Path) -> None:
    report = json.loads((finished / "report.json").read_text())
    again = run(tiny(finished, threads=1, eval_batch_size=7), resume=True)
    assert {k: again[k] for k in ("num_calib", "method", "w_bits")} == {k: report[k] for k in ("num_calib", "method",
                                                                                             "w_bits")}


def test_a_run_made_before_a_setting_existed_resumes_at_its_default_only(finished: Path) -> None:
    marker = json.loads((finished / MARKER).read_text())
    del marker["settings"]["quant.act_grid"]  # as written by a version without quant.act_grid
    (finished / MARKER).write_text(json.dumps(marker))
    run(tiny(finished), resume=True)
    with pytest.raises(RunDirError, match="quant.act_grid: 'affine' in the run, 'symmetric' now"):
        run(tiny(finished, quant=sadag.QuantConfig(act_grid="symmetric")), resume=True)


def test_a_run_made_before_a_changed_default_resumes_at_the_old_behaviour_only(finished: Path) -> None:
    marker = json.loads((finished / MARKER).read_text())
    del marker["settings"]["calib.drop_draw"]  # a version that drew QDrop's masks from float uniforms
    (finished / MARKER).write_text(json.dumps(marker))
    with pytest.raises(RunDirError, match="calib.drop_draw: 'uniform' in the run, 'bytes' now"):
        run(tiny(finished), resume=True)
    run(tiny(finished, calib=sadag.CalibConfig(iters=2, drop_draw="uniform")), resume=True)


MID_STAGE = sadag.GenConfig(genie_iters=20, refine_iters=20)


@pytest.fixture(scope="module")
def sadag_images(tmp_path_factory: pytest.TempPathFactory) -> torch.Tensor:
    out = tmp_path_factory.mktemp("sadag") / "run"
    run(tiny(out, method="sadag", gen=MID_STAGE))
    return torch.load(out / "synthetic" / "images.pt", weights_only=True)["images"]


@pytest.mark.parametrize("stage", ["genie_step.pt", "refine_step.pt"])
def test_a_run_killed_mid_batch_resumes_from_its_mid_stage_checkpoint(tmp_path: Path, stage: str,
                                                                      sadag_images: torch.Tensor,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    gen, out = MID_STAGE, tmp_path / "victim"
    monkeypatch.setattr(builtin, "MID_BATCH_SECONDS", 0.0)  # save the batch in progress at every step
    run_killed_at(monkeypatch, stage, tiny(out, method="sadag", gen=gen))
    step = torch.load(out / "state" / stage, weights_only=True)
    assert step["iteration"] == 1 and (step.get("batch") == 0 or step.get("batches") == [0])
    run(tiny(out, method="sadag", gen=gen), resume=True)
    assert torch.equal(torch.load(out / "synthetic" / "images.pt", weights_only=True)["images"], sadag_images)
    assert not (out / "state" / stage).exists()  # the stage is finished: its mid-stage state is gone


def test_a_run_killed_between_refinement_batches_resumes_bit_for_bit(tmp_path: Path, sadag_images: torch.Tensor,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "victim"
    run_killed_at(monkeypatch, "refined_0.pt", tiny(out, method="sadag", gen=MID_STAGE))
    saved = torch.load(out / "state" / "refined_0.pt", weights_only=True)
    assert saved.keys() == {"images", "e", "h"}  # batch 1's diversity term compares with batch 0's e and h
    old = tmp_path / "old"  # the same kill, as a version that saved the images only left it
    shutil.copytree(out, old)
    torch.save(saved["images"], old / "state" / "refined_0.pt")
    run(tiny(out, method="sadag", gen=MID_STAGE), resume=True)
    assert torch.equal(torch.load(out / "synthetic" / "images.pt", weights_only=True)["images"], sadag_images)
    run(tiny(old, method="sadag", gen=MID_STAGE), resume=True)  # e and h recomputed: resumes, not bit for bit
    assert torch.equal(torch.load(old / "synthetic" / "images.pt", weights_only=True)["images"][:16], sadag_images[:16])


def test_the_device_is_recorded_resolved(finished: Path) -> None:
    run(tiny(finished, device="cpu"), resume=True)  # made with "auto" on a CPU machine: the same run
    marker = json.loads((finished / MARKER).read_text())
    marker["settings"]["device"] = "auto"  # as written before the resolved device was recorded ...
    (finished / MARKER).write_text(json.dumps(marker))
    run(tiny(finished, device="cpu"), resume=True)  # ... read through environment.json's device
    env = json.loads((finished / "environment.json").read_text())
    (finished / "environment.json").write_text(json.dumps({**env, "device": "cuda:0"}))
    with pytest.raises(RunDirError, match="device: 'cuda' in the run, 'cpu' now"):
        run(tiny(finished), resume=True)


def test_the_engine_is_recorded_resolved_and_a_run_resumes_with_its_own(finished: Path) -> None:
    marker = json.loads((finished / MARKER).read_text())
    assert marker["settings"]["calib.engine"] == "fused"  # what auto picks on a CPU
    run(tiny(finished, calib=sadag.CalibConfig(iters=2, engine="fused")), resume=True)  # the same run
    marker["settings"]["calib.engine"] = "eager"  # as if auto had picked eager when the run was made
    (finished / MARKER).write_text(json.dumps(marker))
    with pytest.raises(RunDirError, match="calib.engine: 'eager' in the run, 'fused' now"):
        run(tiny(finished), resume=True)
    run(tiny(finished, calib=sadag.CalibConfig(iters=2, engine="eager")), resume=True)
    del marker["settings"]["calib.engine"]  # made before the setting existed: the eager step
    (finished / MARKER).write_text(json.dumps(marker))
    with pytest.raises(RunDirError, match="calib.engine: 'eager' in the run, 'fused' now"):
        run(tiny(finished), resume=True)
    marker["settings"]["calib.engine"] = "auto"  # recorded as typed, before engines were recorded resolved
    (finished / MARKER).write_text(json.dumps(marker))
    run(tiny(finished), resume=True)


def test_resume_or_force_into_a_directory_that_is_not_a_run_is_refused(tmp_path: Path, cli,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("precious\n")
    for flag in ("--resume", "--force"):
        code, _, err = cli(["run", *TINY, "--method", "noise", "--out", mine, flag])
        assert code == 2 and "is not a sadag run directory" in err, err
    assert (mine / "config.yaml").read_text() == "precious\n" and sorted(os.listdir(mine)) == ["config.yaml"]
    monkeypatch.chdir(mine)  # `--out . --force` in a working directory
    code, _, err = cli(["run", *TINY, "--method", "noise", "--out", ".", "--force"])
    assert code == 2 and "not a sadag run directory" in err and (mine / "config.yaml").is_file()


@pytest.mark.parametrize("field", ["calib_data", "genie_set", "warmup_model", "weights"])
def test_an_input_inside_the_run_directory_is_refused_before_anything_is_deleted(finished: Path, field: str) -> None:
    inputs = {"calib_data": finished / "synthetic", "genie_set": finished / "synthetic",
              "warmup_model": finished / "state" / "seconds.pt", "weights": finished / "state" / "seconds.pt"}
    given = {"calib_data": {"method": "sadag", "calib_data": str(inputs[field])},
             "genie_set": {"method": "genie", "gen": sadag.GenConfig(genie_set=str(inputs[field]))},
             "warmup_model": {"method": "sadag", "gen": sadag.GenConfig(warmup_model=str(inputs[field]))},
             "weights": {"weights": str(inputs[field])}}[field]
    kept = snapshot(finished)
    for again in ({"force": True}, {"resume": True}, {}):
        with pytest.raises(ConfigError, match=f"{field} .* lies inside the run directory --out"):
            run(tiny(finished, **given), **again)
    assert snapshot(finished) == kept


def test_force_does_not_delete_the_set_it_calibrates_on(tmp_path: Path, cli) -> None:
    own = tmp_path / "G2"
    code, _, err = cli(["generate", *TINY, "--method", "noise", "--out", own])
    assert code == 0, err
    code, _, err = cli(["run", *TINY, "--calib-data", own, "--out", own, "--force", "--no-export"])
    assert code == 2 and f"calib_data (--calib-data) {own} lies inside the run directory" in err, err
    assert (own / "images.pt").is_file()


@pytest.mark.parametrize("command", ["run", "generate"])
def test_resume_at_a_missing_or_empty_out_is_refused_on_the_command_line(tmp_path: Path, cli, command: str) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for out, state in ((tmp_path / "typo", "does not exist"), (empty, "is empty")):
        code, _, err = cli([command, *TINY, "--method", "noise", "--out", out, "--resume"])
        assert code == 2 and f"--resume: {out} {state}, so there is no run to continue" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and not any(empty.iterdir())


def test_force_replaces_a_run(finished: Path) -> None:
    (finished / "state" / "stale.pt").write_bytes(b"old")
    run(tiny(finished, seed=3), force=True)
    assert not (finished / "state" / "stale.pt").exists()
    assert json.loads((finished / MARKER).read_text())["settings"]["seed"] == 3


def test_a_second_process_is_refused_while_the_first_holds_the_run(finished: Path) -> None:
    settings = result_settings(apply_preset(tiny(finished)), "cpu")
    with RunDir(finished, settings, resume=True):
        with pytest.raises(RunDirError, match="in use by another sadag process"):
            run(tiny(finished), resume=True)
        with pytest.raises(RunDirError, match="in use by another sadag process"):
            run(tiny(finished), force=True)
        assert (finished / "report.json").is_file()  # --force did not wipe the live run
    run(tiny(finished), resume=True)  # released


def test_the_lock_holds_across_processes(finished: Path) -> None:
    settings = result_settings(apply_preset(tiny(finished)), "cpu")
    code = ("import sys; from sadag.rundir import RunDir, RunDirError\n"
            f"try: RunDir({str(finished)!r}, {settings!r}, resume=True)\n"
            "except RunDirError as e: print(e); sys.exit(3)\n")
    with RunDir(finished, settings, resume=True):
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.returncode == 3 and "in use by another sadag process" in child.stdout, child.stderr


class _Payload:
    def __init__(self, canary: Path):
        self.canary = canary

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (self.canary,))


@pytest.mark.parametrize("content", ["garbage", "truncated", "pickle"])
def test_an_unreadable_checkpoint_names_the_file_and_the_remedy(finished: Path, content: str) -> None:
    target = finished / "state" / "calib.pt"
    canary = finished.parent / "pwned"
    if content == "garbage":
        target.write_bytes(b"\x00not a checkpoint" * 10)
    elif content == "truncated":
        target.write_bytes(target.read_bytes()[:100])
    else:  # a pickle planted in a shared run directory: never executed on resume
        torch.save({"next_unit": 0, "state_dict": _Payload(canary)}, target)
    with pytest.raises(RunDirError) as err:
        run(tiny(finished), resume=True)
    assert str(target) in str(err.value) and "delete it and rerun the same command with --resume" in str(err.value)
    assert not canary.exists()
    target.unlink()  # the remedy works
    assert run(tiny(finished), resume=True)["num_calib"] == 32


def test_a_calibration_checkpoint_of_another_layout_names_its_file_and_the_remedy(finished: Path) -> None:
    path = finished / "state" / "calib.pt"
    saved = torch.load(path, weights_only=True)
    del saved["state_dict"][next(iter(saved["state_dict"]))]
    torch.save(saved, path)
    with pytest.raises(RunDirError, match="does not fit this run's quantized model") as err:
        run(tiny(finished), resume=True)
    assert str(path) in str(err.value) and "start over with --force" in str(err.value)


def test_resume_removes_orphaned_temporary_files(finished: Path) -> None:
    orphans = [finished / "state" / ".calib.pt.x1.tmp", finished / ".report.json.x2.tmp"]
    for path in orphans:
        path.write_bytes(b"half")
    run(tiny(finished), resume=True)
    assert not any(p.exists() for p in orphans)


def test_checkpoints_and_sets_are_plain_data(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(sadag.RunConfig(model="conftest:tiny_bn_model", method="sadag", preset="smoke", out=str(out),
                        calib=sadag.CalibConfig(iters=2), gen=sadag.GenConfig(genie_iters=2, refine_iters=1)))
    files = sorted((out / "state").glob("*.pt")) + [out / "synthetic" / "images.pt"]
    assert {p.name for p in files} >= {"genie_batch_0.pt", "genie_batch_1.pt", "warmup_calib.pt", "refined_0.pt",
                                       "calib.pt", "seconds.pt", "images.pt"}
    for path in files:
        check_plain(torch.load(path, weights_only=True), str(path))
    with pytest.raises(TypeError, match="store tensors and plain containers only"):
        RunDir(tmp_path / "other", {}).save_state("x.pt", {"batch": Path("a")})


def test_python_m_sadag_runs_the_cli() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "sadag", "models"], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0 and "resnet20_cifar10" in done.stdout, done.stderr
    bad = subprocess.run([sys.executable, "-m", "sadag", "run", "--device", "tpu", "--out", "x"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "device (--device): got 'tpu'" in bad.stderr



def test_atomic_files_get_the_mode_open_would_give(tmp_path: Path) -> None:
    from sadag.files import write_atomically
    from sadag.rundir import atomic_write_text

    def private_replace(tmp: str) -> None:  # as safetensors >= 0.8 writes: its own 0600 file renamed over tmp
        Path(tmp + ".x").write_text("{}")
        os.chmod(tmp + ".x", 0o600)
        os.replace(tmp + ".x", tmp)

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.json", "{}")
        write_atomically(tmp_path / "model.safetensors", private_replace)
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"report.json": 0o644, "model.safetensors": 0o644, "plain.json": 0o644}  # mkstemp gives 0600


def test_a_stage_redone_whole_on_resume_counts_its_last_run(tmp_path: Path, monkeypatch) -> None:
    from sadag import pipeline

    clock = iter(range(0, 100, 5))  # every perf_counter call 5 s after the last
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: float(next(clock)))
    rundir = RunDir(tmp_path / "r", {})
    for _ in range(2):  # a run, then its resume
        stages = pipeline._Stages(rundir, None)
        with stages.stage("calibrate"):  # checkpointed: a resume adds what it spends
            pass
        with stages.stage("quant_eval", redone_whole=True):  # done again from the start
            pass
    assert stages.seconds == {"calibrate": 10.0, "quant_eval": 5.0}


def test_a_resume_keeps_every_session_environment(finished: Path) -> None:
    first = json.loads((finished / "environment.json").read_text())
    assert first["sessions"] == [{k: v for k, v in first.items() if k != "sessions"}]
    run(tiny(finished), resume=True)
    env = json.loads((finished / "environment.json").read_text())
    assert env["sessions"][0] == first["sessions"][0] and len(env["sessions"]) == 2
    assert env["device"] == "cpu" and env["sessions"][1] == {k: v for k, v in env.items() if k != "sessions"}


def test_the_environment_names_the_machine_and_never_fails_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """environment.json says where a session ran (two machines round floats differently): the host, and the CPU
    from /proc/cpuinfo on Linux, else what platform knows, else None."""
    import builtins
    import platform

    from sadag.rundir import environment

    env = environment(torch.device("cpu"))
    assert env["host"] == (platform.node() or None)
    if platform.system() == "Linux" and Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        assert env["cpu_model"] == (names[0] if names else platform.processor() or None)
    real_open = builtins.open

    def unreadable(file, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if str(file) == "/proc/cpuinfo":
            raise PermissionError(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(builtins, "open", unreadable)
    monkeypatch.setattr(platform, "processor", lambda: "x86_64")
    assert environment(torch.device("cpu"))["cpu_model"] == "x86_64"
    monkeypatch.setattr(platform, "processor", lambda: "")
    assert environment(torch.device("cpu"))["cpu_model"] is None
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(platform, "processor", lambda: "arm")
    assert environment(torch.device("cpu"))["cpu_model"] == "arm"
