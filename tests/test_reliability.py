"""Reliability of the HF-Trainer stages: a NaN/inf loss stops the run (or skips the batch), never a checkpoint.

A learning rate of 1e30 makes the first update blow the weights up, so the loss of step 2 is
NaN for certain; step 1 is an ordinary step and its checkpoint is the "last good" one.
"""

from __future__ import annotations

import json

import pytest
from conftest import run_stage, stage_env

DIVERGING = ["--do_train", "--finetuning_type", "full", "--max_steps", "4", "--save_steps", "1",
             "--learning_rate", "1e30", "--max_grad_norm", "0", "--per_device_train_batch_size", "4",
             "--cutoff_len", "64", "--logging_steps", "1", "--report_to", "none"]
DATASETS = {"pt": "demo_pt", "sft": "demo_sft"}


@pytest.mark.parametrize("stage", ["pt", "sft"])
def test_nan_loss_stops_and_keeps_the_last_checkpoint(stage, tiny_model, demo_data, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    result = run_stage(stage, "--model_name_or_path", tiny_model, "--dataset", DATASETS[stage],
                       "--dataset_dir", demo_data, "--output_dir", out, *DIVERGING, check=False,
                       env=stage_env(OMP_NUM_THREADS="1"))
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("stopped (rank 0): the training loss is nan at step 2;"), last
    assert "--nan_policy skip" in last and "Traceback" not in result.stderr
    # Nothing after step 1 was written: its checkpoint is intact and loads; no final model.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (out / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoint-1")
    assert all(bool(param.isfinite().all()) for param in model.parameters())
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["global_step"] == 1


def test_nan_loss_skip_finishes_and_counts(tiny_model, demo_data, tmp_path):
    out = tmp_path / "run"
    run_stage("pt", "--model_name_or_path", tiny_model, "--dataset", "demo_pt", "--dataset_dir", demo_data,
              "--output_dir", out, *DIVERGING, "--nan_policy", "skip", env=stage_env(OMP_NUM_THREADS="1"))
    logged = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    steps = [row for row in logged if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2, 3, 4]
    assert steps[0]["loss"] > 1 and "skipped_batches" not in steps[0]
    assert [row["skipped_batches"] for row in steps[1:]] == [1, 2, 3]
    assert all(row["grad_norm"] == 0 for row in steps[1:])  # a skipped batch adds no gradient
    assert (out / "model.safetensors").exists()


def test_bad_nan_policy_is_a_user_error(tiny_model, demo_data, tmp_path):
    result = run_stage("pt", "--model_name_or_path", tiny_model, "--dataset", "demo_pt", "--dataset_dir", demo_data,
                       "--output_dir", tmp_path / "run", "--do_train", "--nan_policy", "ignore", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[-1]]
    assert "--nan_policy" in result.stderr and "stop" in result.stderr and "skip" in result.stderr


def pythonpath_with_hook(tmp_path, source: str) -> str:
    """A PYTHONPATH whose first folder holds `source` as sitecustomize.py (run first by every process)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(source)
    return f"{hook}:{stage_env()['PYTHONPATH']}"


FAIL_ON_RANK_1 = '''
import os

if os.environ.get("RANK") == "1":  # this file is a sitecustomize: it runs first in every process
    import transformers

    step = transformers.Trainer.training_step

    def failing_step(self, *args, **kwargs):
        if self.state.global_step >= 2:
            raise RuntimeError("injected failure on rank 1")
        return step(self, *args, **kwargs)

    transformers.Trainer.training_step = failing_step
'''


@pytest.mark.slow
def test_one_rank_failing_stops_the_job_in_bounded_time(tiny_model, demo_data, tmp_path):
    """Rank 1 raises at step 3; rank 0 then waits in a collective: the launcher must end both."""
    import time

    from conftest import launch

    start = time.monotonic()
    result = launch("sft", "--model_name_or_path", tiny_model, "--dataset", "demo_sft", "--dataset_dir", demo_data,
                    "--output_dir", tmp_path / "run", "--do_train", "--max_steps", "200", "--save_steps", "1000",
                    "--per_device_train_batch_size", "2", "--cutoff_len", "64", "--report_to", "none", check=False,
                    timeout=600, PYTHONPATH=pythonpath_with_hook(tmp_path, FAIL_ON_RANK_1))
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert "rank 1 failed: RuntimeError: injected failure on rank 1" in result.stderr + result.stdout
    # Start-up (two ranks importing torch/transformers/deepspeed) takes most of it; a hang would
    # last until the collective's 30-minute timeout.
    assert elapsed < 180, elapsed


KILL_DURING_SAVE = '''
import os
import signal

import transformers

save_rng = transformers.Trainer._save_rng_state


def dying_save(self, output_dir):  # the model and optimizer of this checkpoint are written by now
    if self.state.global_step == int(os.environ["KILL_AT_SAVE_OF_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return save_rng(self, output_dir)


transformers.Trainer._save_rng_state = dying_save
'''


@pytest.mark.parametrize("stage", ["pt", "sft"])
def test_sigkill_while_saving_keeps_the_last_checkpoint_and_resume_matches(stage, tiny_model, demo_data, tmp_path):
    """SIGKILL in the middle of writing checkpoint-2: checkpoint-1 is intact, no half checkpoint-2 appears,
    and `--resume_from_checkpoint last` ends with the weights of a run that was never interrupted."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    args = ["--model_name_or_path", tiny_model, "--dataset", DATASETS[stage], "--dataset_dir", demo_data,
            "--do_train", "--finetuning_type", "full", "--max_steps", "4", "--save_steps", "1",
            "--learning_rate", "1e-3", "--per_device_train_batch_size", "4", "--cutoff_len", "64",
            "--logging_steps", "1", "--report_to", "none"]
    env = stage_env(OMP_NUM_THREADS="1")
    run_stage(stage, *args, "--output_dir", tmp_path / "whole", env=env)

    out = tmp_path / "killed"
    killed = run_stage(stage, *args, "--output_dir", out, check=False,
                       env={**env, "KILL_AT_SAVE_OF_STEP": "2",
                            "PYTHONPATH": pythonpath_with_hook(tmp_path, KILL_DURING_SAVE)})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert (out / ".saving" / "checkpoint-2" / "model.safetensors").exists()  # the half-written one, aside
    AutoModelForCausalLM.from_pretrained(out / "checkpoint-1")

    run_stage(stage, *args, "--output_dir", out, "--resume_from_checkpoint", "last", env=env)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{n}" for n in (1, 2, 3, 4)]
    assert not (out / ".saving").exists()
    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert (whole[key] - resumed[key]).abs().max() <= 1e-6, key
    # The resumed loss curve continues the interrupted one: steps 2-4 logged once more, as in the whole run.
    losses = {row["step"]: row["loss"] for row in map(json.loads, (tmp_path / "whole" / "trainer_log.jsonl")
                                                      .read_text().splitlines()) if "loss" in row}
    resumed_losses = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    tail = {row["step"]: row["loss"] for row in resumed_losses if "loss" in row and row["step"] > 1}
    assert tail == pytest.approx({step: losses[step] for step in (2, 3, 4)}, abs=1e-5)
