"""User errors of issue 2: one line `error: ...` naming the flag or file, exit status 2, no traceback.

Every case runs the real entry point (`python -m stages.sft|pt ...`) in a fresh process. The
cases are independent, so the selected ones run side by side (one per core) when the first
test asks; each test then checks its own outcome. A case changes one thing in an otherwise valid command, and
its message must name that thing, so a case cannot pass on another error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, run_stage, stage_env


@dataclass(frozen=True)
class Case:
    stage: str
    args: Callable[[dict[str, Path]], list[str]]  # paths of the `env` fixture -> argv
    names: Callable[[dict[str, Path]], list[str]]  # what the message must contain (flag, file, line)
    args_only: bool = True  # fails at argument validation: nothing else on stderr before it


def base(env: dict[str, Path], out: str | Path, dataset: str = "demo_sft", model: Path | None = None) -> list[str]:
    """A valid command line (pt and sft take the same flags); `out`: a folder name under env["out"] or a path."""
    return ["--model_name_or_path", model or env["model"], "--dataset", dataset, "--dataset_dir", env["data"],
            "--output_dir", env["out"] / out, "--do_train", "--max_steps", "1", "--report_to", "none"]


CASES: dict[str, Case] = {
    "unknown_dataset": Case(
        "sft", lambda e: base(e, "unknown_dataset", "no_such_set"),
        lambda e: ["'no_such_set'", "--dataset", "dataset_info.json"]),
    "missing_data_file": Case(
        "sft", lambda e: base(e, "missing_data_file", "gone"),
        lambda e: [str(e["data"] / "not_there.json")]),
    "missing_column": Case(
        "sft", lambda e: base(e, "missing_column", "no_column"),
        lambda e: ["'no_column'", "question", "columns"], args_only=False),
    "malformed_json": Case(
        "sft", lambda e: base(e, "malformed_json", "broken"),
        lambda e: [str(e["data"] / "broken.json"), "line 3"], args_only=False),
    "unknown_flag": Case(
        "sft", lambda e: [*base(e, "unknown_flag"), "--lora_rnak", "4"],
        lambda e: ["--lora_rnak"]),
    "unknown_key_in_config": Case(
        "sft", lambda e: [e["bad_config"], *base(e, "unknown_key_in_config")],
        lambda e: ["lora_rnak", str(e["bad_config"])]),
    "missing_config_file": Case(
        "pt", lambda e: [e["data"] / "no_such.yaml", *base(e, "missing_config_file", "demo_pt")],
        lambda e: [str(e["data"] / "no_such.yaml")]),
    "quantization_with_full": Case(
        "sft", lambda e: [*base(e, "quantization_with_full"), "--quantization_bit", "4", "--finetuning_type", "full"],
        lambda e: ["--quantization_bit", "--finetuning_type"]),
    "8bit_under_zero3": Case(
        "sft", lambda e: [*base(e, "8bit_under_zero3"), "--quantization_bit", "8",
                          "--deepspeed", ROOT / "ds_configs" / "zero3.json"],
        lambda e: ["--quantization_bit", "ZeRO-3"]),
    "model_dir_not_a_model": Case(
        "pt", lambda e: base(e, "model_dir_not_a_model", "demo_pt", model=e["not_a_model"]),
        lambda e: ["--model_name_or_path", str(e["not_a_model"])]),
    "lora_rank_zero": Case(
        "sft", lambda e: [*base(e, "lora_rank_zero"), "--lora_rank", "0"],
        lambda e: ["--lora_rank"]),
    "output_dir_holds_a_run": Case(
        "sft", lambda e: base(e, e["run"]),
        lambda e: ["--output_dir", str(e["run"]), "--overwrite_output_dir", "--resume_from_checkpoint"]),
    # Accepted with --overwrite_output_dir / when resuming: those runs get past the output_dir
    # check and stop at the next mistake planted in them (a missing column, found at data loading).
    "output_dir_overwrite_accepted": Case(
        "sft", lambda e: [*base(e, e["run_to_overwrite"], "no_column"), "--overwrite_output_dir"],
        lambda e: ["'no_column'", "question"], args_only=False),
    "output_dir_resume_accepted": Case(
        "sft", lambda e: [*base(e, e["run_to_resume"], "no_column"), "--resume_from_checkpoint", "last"],
        lambda e: ["'no_column'", "question"], args_only=False),
}


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model, demo_data) -> dict[str, Path]:
    """A registry with planted mistakes, a bad config file, runs that already exist, a non-model dir."""
    root = tmp_path_factory.mktemp("user_errors")
    data = root / "data"
    data.mkdir()
    info = json.loads((demo_data / "dataset_info.json").read_text())
    for entry in info.values():
        entry["file_name"] = str(demo_data / entry["file_name"])
    # Line 3 misses a comma (tests/test_data.py covers JSON Lines and the other layouts in process).
    (data / "broken.json").write_text('[\n{"instruction": "a", "output": "b"},\n'
                                      '{"instruction": "c" "output": "d"}\n]\n')
    info.update({
        "gone": {"file_name": "not_there.json"},
        "no_column": {"file_name": str(demo_data / "demo_sft.json"), "columns": {"prompt": "question"}},
        "broken": {"file_name": "broken.json"},
    })
    (data / "dataset_info.json").write_text(json.dumps(info, indent=2))
    (root / "bad.yaml").write_text("finetuning_type: lora\nlora_rnak: 4\n")
    not_a_model = root / "not_a_model"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("my notes, not a model\n")
    paths = {"model": tiny_model, "data": data, "out": root / "out", "bad_config": root / "bad.yaml",
             "not_a_model": not_a_model}
    # An earlier attempt of the malformed_json command stopped at its data error and left only its
    # run_config.json: that is not a run, so the same command runs again (and stops at the data).
    (paths["out"] / "malformed_json").mkdir(parents=True)
    (paths["out"] / "malformed_json" / "run_config.json").write_text('{"stage": "sft"}')
    for name in ("run", "run_to_overwrite", "run_to_resume"):  # someone's earlier run
        run = root / name
        (run / "checkpoint-1").mkdir(parents=True)
        (run / "adapter_model.safetensors").write_bytes(b"weights the user trained")
        (run / "checkpoint-1" / "trainer_state.json").write_text('{"global_step": 1}')
        (run / "notes.txt").write_text("keep me\n")
        paths[name] = run
    return paths


FILE_CASES = ("output_dir_holds_a_run", "model_dir_not_a_model", "output_dir_overwrite_accepted",
              "output_dir_resume_accepted")  # read by test_refused_runs_leave_the_users_files_untouched


@pytest.fixture(scope="module")
def outcomes(request, env) -> dict[str, subprocess.CompletedProcess]:
    """Run the selected cases once, side by side (one per core); each test reads its own outcome."""
    selected = set()
    for item in request.session.items:  # `-k one_case` starts one process, not all of them
        if item.originalname == test_user_error_is_one_line_naming_the_fix.__name__:
            selected.add(item.callspec.params["name"])
        elif item.originalname == test_refused_runs_leave_the_users_files_untouched.__name__:
            selected.update(FILE_CASES)
    before = {name: _snapshot(env[name]) for name in ("run", "not_a_model")}

    def run(name: str) -> subprocess.CompletedProcess:
        case = CASES[name]
        return run_stage(case.stage, *case.args(env), check=False, timeout=300)

    names = [name for name in CASES if name in selected]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = dict(zip(names, pool.map(run, names)))
    return {**results, "_before": before}


@pytest.mark.parametrize("name", list(CASES))
def test_user_error_is_one_line_naming_the_fix(name, env, outcomes):
    result = outcomes[name]
    stderr = result.stderr.strip()
    assert result.returncode == 2, f"exit {result.returncode}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.splitlines()
    error_lines = [line for line in lines if line.startswith("error:")]
    assert len(error_lines) == 1 and lines[-1] == error_lines[0], stderr[-3000:]
    if CASES[name].args_only:  # argument validation: before any log line, progress bar or warning
        assert lines == error_lines, stderr[-3000:]
    for needed in CASES[name].names(env):
        assert needed in error_lines[0], f"{needed!r} not named in: {error_lines[0]}"


def test_refused_runs_leave_the_users_files_untouched(env, outcomes):
    assert outcomes["output_dir_holds_a_run"].returncode == 2
    assert outcomes["model_dir_not_a_model"].returncode == 2
    for name in ("run", "not_a_model"):
        assert _snapshot(env[name]) == outcomes["_before"][name], f"{env[name]} was modified"
    # The accepted runs were allowed to write (their own config), and kept what the user had.
    for name in ("run_to_overwrite", "run_to_resume"):
        assert (env[name] / "run_config.json").is_file()
        assert (env[name] / "notes.txt").read_text() == "keep me\n"
    resumed = json.loads((env["run_to_resume"] / "run_config.json").read_text())
    assert Path(resumed["resume_from_checkpoint"]) == env["run_to_resume"] / "checkpoint-1"


def test_help_exits_0_without_deepspeed_or_wandb():
    # -X importtime lists every module the process imported, on stderr.
    result = run_stage("sft", "--help", check=False, env=stage_env(PYTHONPROFILEIMPORTTIME="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    for flag in ("--model_name_or_path", "--dataset", "--template", "--packing", "--lora_rank",
                 "--quantization_bit", "--overwrite_output_dir", "--learning_rate", "--deepspeed"):
        assert flag in result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert not {m for m in imported if m.split(".")[0] in ("deepspeed", "wandb", "trl")}


@pytest.mark.parametrize("stage", ["sft", "pt"])
def test_importing_a_stage_is_light(stage):
    """Importing the module (calling nothing) pulls in no heavy library; a fresh interpreter each."""
    code = (f"import sys, json, stages.{stage}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('deepspeed', 'wandb', 'bitsandbytes', 'trl', 'peft'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=stage_env(), capture_output=True,
                            text=True, timeout=120, check=True)
    assert json.loads(result.stdout) == []
