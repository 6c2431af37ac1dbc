"""Reliability of the training stages: a NaN/inf loss stops the run (or skips the batch), never a checkpoint;
a run killed while saving resumes to the weights of an uninterrupted one.

A learning rate of 1e30 makes the first update blow the weights up, so the loss of step 2 is
NaN for certain; step 1 is an ordinary step and its checkpoint is the "last good" one. In
encode, where each passage trains its own LoRA, one passage's LoRA is made to blow up so
that its neighbours in the batch can be compared with a run where none did.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from helpers import run_stage, stage_env

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
import signal

if os.environ.get("RANK") == "1":  # this file is a sitecustomize: it runs first in every process
    import transformers

    step = transformers.Trainer.training_step

    def failing_step(self, *args, **kwargs):
        if self.state.global_step >= 2:
            if os.environ["FAILURE"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("injected failure on rank 1")
        return step(self, *args, **kwargs)

    transformers.Trainer.training_step = failing_step
'''


def _same_state(a: object, b: object) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    return list(a) == list(b) if isinstance(a, (list, tuple)) else a == b


@pytest.mark.parametrize("optim", ["adamw_torch", "adafactor", "sgd", "adamw_bnb_8bit", "lion_8bit"])
def test_optimizer_state_goes_through_safetensors_and_json(optim, tmp_path):
    """Checkpoints write an optimizer's state_dict as safetensors + JSON (no pickle), bitsandbytes' 8-bit
    state too (its quantized moments and block scales nest in a dict per weight); read back into a fresh
    optimizer, the next step is the original's."""
    from transformers import Trainer, TrainingArguments

    from stages.core.checkpoint import optimizer_state_from_files, optimizer_state_to_files

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(
        TrainingArguments(output_dir=str(tmp_path), optim=optim, use_cpu=True, report_to="none"))
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 64))  # 4096 elements: bitsandbytes' 8-bit state from there on
    optimizer = optimizer_cls([weight], **kwargs)
    weight.grad = torch.randn(64, 64)
    optimizer.step()

    optimizer_state_to_files(optimizer.state_dict(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer.json", "optimizer.safetensors"]
    loaded = optimizer_state_from_files(tmp_path)
    assert _same_state(optimizer.state_dict()["state"], loaded["state"])
    twin = torch.nn.Parameter(weight.detach().clone())
    fresh = optimizer_cls([twin], **kwargs)
    fresh.load_state_dict(loaded)
    grad = torch.randn(64, 64)
    for param, opt in ((weight, optimizer), (twin, fresh)):
        param.grad = grad.clone()
        opt.step()
    assert torch.equal(weight, twin)


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["raise", "kill"])
def test_one_rank_failing_stops_the_job_in_bounded_time(failure, tiny_model, demo_data, tmp_path):
    """Rank 1 raises, or is killed (SIGKILL), at step 3; rank 0 then waits in a collective: the launcher must
    end both, and say which rank failed and why."""
    import time

    from helpers import launch

    start = time.monotonic()
    result = launch("sft", "--model_name_or_path", tiny_model, "--dataset", "demo_sft", "--dataset_dir", demo_data,
                    "--output_dir", tmp_path / "run", "--do_train", "--max_steps", "200", "--save_steps", "1000",
                    "--per_device_train_batch_size", "2", "--cutoff_len", "64", "--report_to", "none", check=False,
                    timeout=600, PYTHONPATH=pythonpath_with_hook(tmp_path, FAIL_ON_RANK_1), FAILURE=failure)
    elapsed = time.monotonic() - start
    output = result.stderr + result.stdout
    assert result.returncode != 0
    if failure == "raise":
        assert "rank 1 failed: RuntimeError: injected failure on rank 1" in output
    else:  # no last words: the launcher's line names the rank's command (--local_rank=1) and the signal
        assert re.search(r"--local_rank=1'.*\] exits with return code = -9", output), output[-3000:]
    # Start-up (two ranks importing torch/transformers/deepspeed) takes most of it; a hang would
    # last until the collective's 30-minute timeout.
    assert elapsed < 180, elapsed


FINISHING_RANK = '''
import atexit
import os
import sys
import threading
from pathlib import Path

import torch.distributed as dist

from stages.core.errors import main_guard

out = Path(sys.argv[1])
worker_done = threading.Event()


def entrypoint(argv):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    os.environ["WORLD_SIZE"] = "2"  # what the launcher sets on every rank of a two-rank job
    atexit.register(lambda: (out / "exit_handler_ran").write_text(str(dist.is_initialized())))
    if sys.argv[2] == "busy":  # a non-daemon thread still working: the interpreter must wait for it
        threading.Thread(target=worker_done.wait).start()


main_guard(entrypoint)()
(out / "returned").write_text("")  # reached only where the rank does not leave at once
worker_done.set()
'''


@pytest.mark.parametrize("busy", [False, True])
def test_a_finished_rank_leaves_without_interpreter_teardown(busy, tmp_path):
    """A rank whose run succeeded destroys its process group, runs the exit handlers and leaves with
    status 0 before the interpreter tears down (where the process group's threads could abort it);
    with a non-daemon thread still running it returns normally instead."""
    import subprocess
    import sys

    script = tmp_path / "finishing_rank.py"
    script.write_text(FINISHING_RANK)
    result = subprocess.run([sys.executable, str(script), str(tmp_path), "busy" if busy else "idle"],
                            capture_output=True, text=True, timeout=120, env=stage_env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "exit_handler_ran").read_text() == "False"  # the group was gone before the handlers ran
    assert (tmp_path / "returned").exists() == busy


KILL_DURING_SAVE = '''
import os
import signal

from stages.core.trainers import StageTrainer

save_rng = StageTrainer._save_rng_state


def dying_save(self, output_dir):  # the model, optimizer and scheduler of this checkpoint are written by now
    if self.state.global_step == int(os.environ["KILL_AT_SAVE_OF_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return save_rng(self, output_dir)


StageTrainer._save_rng_state = dying_save
'''


@pytest.mark.parametrize("stage", ["sft"])
def test_sigkill_while_saving_keeps_the_last_checkpoint_and_resume_matches(stage, tiny_model, demo_data, tmp_path):
    """SIGKILL in the middle of writing checkpoint-2: checkpoint-1 is intact, no half checkpoint-2 appears,
    and `--resume_from_checkpoint last` (optimizer, scheduler and RNG from safetensors + JSON) ends with
    the weights of a run that was never interrupted. (pt saves through the same trainer; its resume is
    checked in test_distributed.)"""
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
    pickles = [str(p.relative_to(out)) for p in out.rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl")]
    assert not pickles, pickles  # checkpoints and outputs: safetensors + JSON only
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


@pytest.mark.parametrize("leftover", [".saving/checkpoint-1/model.safetensors",
                                      ".checkpoint-1.tmp/projector.safetensors"])
def test_a_run_killed_during_its_first_save_starts_again_without_overwrite(leftover, tmp_path):
    """Nothing whole was written (only run_config.json and a half checkpoint): the same command starts anew.
    Anything else in the folder is a run and is refused, with the fix that applies (resume only from a checkpoint)."""
    from stages.core.errors import UserError
    from stages.core.stage import prepare_output_dir

    out = tmp_path / "run"
    (out / leftover).parent.mkdir(parents=True)
    (out / leftover).write_bytes(b"half")
    (out / "run_config.json").write_text("{}")
    prepare_output_dir(str(out), overwrite=False, resumable=True)
    for kept, fix in (("checkpoint-1", "--resume_from_checkpoint last"), ("trainer_log.jsonl", "--overwrite_output")):
        (out / kept).mkdir()
        with pytest.raises(UserError, match="already holds a run") as refused:
            prepare_output_dir(str(out), overwrite=False, resumable=True)
        assert fix in str(refused.value)
        (out / kept).rmdir()


def test_resume_auto_is_last_with_a_notice(tmp_path, caplog):
    """`--resume_from_checkpoint auto` (the projector's old spelling) resolves as `last`, with one notice."""
    import logging
    from types import SimpleNamespace

    from stages.core.stage import resolve_resume

    for step in (2, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    training_args = SimpleNamespace(output_dir=str(tmp_path), resume_from_checkpoint="auto")
    with caplog.at_level(logging.INFO, logger="stages.core.stage"):
        resolve_resume(training_args)
    assert training_args.resume_from_checkpoint == str(tmp_path / "checkpoint-10")
    # Only this module's records: importing transformers first in the process may log a bitsandbytes line.
    assert [r.getMessage() for r in caplog.records if r.name == "stages.core.stage"] == [
        "--resume_from_checkpoint auto is renamed --resume_from_checkpoint last; the old name is accepted until "
        "the next release."]


# -------------------------------------------------------- projector and encode: loops of their own

KILL_WHILE_WRITING = '''
import os
import signal

import safetensors.torch

save_file = safetensors.torch.save_file


def dying_save_file(tensors, filename, *args, **kwargs):  # as a SIGKILL in the middle of the write leaves it
    save_file(tensors, filename, *args, **kwargs)
    if str(filename).endswith(os.environ["KILL_WHILE_WRITING"]):
        os.truncate(filename, os.path.getsize(filename) // 2)
        os.kill(os.getpid(), signal.SIGKILL)


safetensors.torch.save_file = dying_save_file
'''
ENCODE = ["--num_train_epochs", "2", "--learning_rate", "1e-2", "--passages_per_batch", "2",
          "--report_to", "none"]  # 6 passages in 3 batches; 2 epochs of 1 text: a 2nd update can diverge


@pytest.fixture(scope="module")
def encode_records(demo_data, tmp_path_factory) -> Path:
    """Two demo_qa records whose six passages all differ, so each passage is its own bank row (records that
    share a passage share its row: tests/test_encode.py)."""
    first, *rest = json.loads((demo_data / "demo_qa.json").read_text())
    second = next(r for r in rest if not set(r["passages"]) & set(first["passages"]))
    out = tmp_path_factory.mktemp("reliability_records") / "records.json"
    out.write_text(json.dumps([first, second]))
    return out


def encode_in_process(tiny_model, records, out, *extra) -> None:
    """stages.encode in this process: the imports are paid once (the killed runs alone need a process)."""
    from stages.encode import main

    main([str(a) for a in ["--model_name_or_path", tiny_model, "--input_file", records, "--output_dir", out, *ENCODE,
                           *extra]])


@pytest.fixture(scope="module")
def clean_bank(tiny_model, encode_records, tmp_path_factory):
    """An uninterrupted encode run, one shard per batch: the reference, and the projector's bank."""
    out = tmp_path_factory.mktemp("reliability") / "bank"
    encode_in_process(tiny_model, encode_records, out, "--shard_size", "2")
    return out


@pytest.fixture(scope="module")
def encode_batches(tiny_model, encode_records) -> list[list[str]]:
    """The passage ids of each batch of the ENCODE runs, as stages.encode plans them."""
    from transformers import AutoTokenizer

    from dyprag.passage_training import passage_texts, plan_batches

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    records = json.loads(encode_records.read_text())
    ids = [f"{r['test_id']}_{p}" for r in records for p in range(len(r["passages"]))]
    sizes = [sum(map(len, passage_texts(tokenizer, passage))) for r in records for passage in r["passages"]]
    return [[ids[i] for i in batch] for batch in plan_batches(sizes, 2)]


def diverge_after_first_update(monkeypatch, batch: int, row: int) -> None:
    """The LoRA of row `row` of the `batch`-th batch (from 1) blows up (1e30) at its first update, as a far too
    high learning rate does: its next forward, through the real code, gives a non-finite loss."""
    import dyprag.passage_training

    encode_batch, step = dyprag.passage_training.encode_batch, dyprag.passage_training.BatchedAdamW.step
    batches = 0

    def counting_batch(*args, **kwargs):
        nonlocal batches
        batches += 1
        return encode_batch(*args, **kwargs)

    def diverging_step(self, number, active=None):
        step(self, number, active)
        if number == 1 and batches == batch:
            with torch.no_grad():
                for param in self.params:
                    param[row] = 1e30

    monkeypatch.setattr(dyprag.passage_training, "encode_batch", counting_batch)
    monkeypatch.setattr(dyprag.passage_training.BatchedAdamW, "step", diverging_step)


def assert_same_loras(bank_dir, reference_dir, ids, atol: float = 1e-6) -> None:
    """The LoRAs of `ids` in both banks agree within `atol` (the banks' shards checked by sha256)."""
    from dyprag.bank import LoraBank

    got, expected = LoraBank(bank_dir).load(ids), LoraBank(reference_dir).load(ids)
    diff = max((got[name][i] - expected[name][i]).abs().max().item() for name in expected for i in (0, 1))
    assert diff <= atol, diff


def test_encode_nan_stops_after_writing_the_earlier_batches(monkeypatch, capsys, tiny_model, encode_records,
                                                            clean_bank, encode_batches, tmp_path):
    """A passage of batch 2 diverges: batch 1 (still buffered, shard_size 4) is written, nothing of batch 2;
    --resume_from_checkpoint last then finishes the bank with the LoRAs of the uninterrupted run."""
    bad = encode_batches[1][0]
    out = tmp_path / "bank"
    with monkeypatch.context() as patch:
        diverge_after_first_update(patch, batch=2, row=0)
        with pytest.raises(SystemExit) as stopped:
            encode_in_process(tiny_model, encode_records, out, "--shard_size", "4")
    assert stopped.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"stopped (rank 0): the training loss of passage(s) {bad} became NaN/inf (batch 2);")
    assert "--resume_from_checkpoint last" in last and "--nan_policy skip" in last
    part = json.loads((out / "index.rank00000.json").read_text())
    assert sorted(part["passages"]) == sorted(encode_batches[0]) and not (out / "index.json").exists()

    encode_in_process(tiny_model, encode_records, out, "--shard_size", "4", "--resume_from_checkpoint", "last")
    assert_same_loras(out, clean_bank, [pid for batch in encode_batches for pid in batch])


def test_encode_nan_skip_leaves_the_passage_out(monkeypatch, tiny_model, encode_records, clean_bank, encode_batches,
                                                tmp_path):
    from dyprag.bank import LoraBank

    bad = encode_batches[1][0]
    out = tmp_path / "bank"
    diverge_after_first_update(monkeypatch, batch=2, row=0)
    encode_in_process(tiny_model, encode_records, out, "--shard_size", "2", "--nan_policy", "skip")
    others = [pid for batch in encode_batches for pid in batch if pid != bad]
    assert sorted(LoraBank(out).passage_ids) == sorted(others)
    summary = json.loads((out / "encode_summary.json").read_text())
    assert (summary["passages"], summary["encoded_now"], summary["skipped_passages"]) == (5, 5, 1)
    assert summary["skipped_passage_ids"] == [bad]
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [row.get("skipped_passages") for row in log] == [None, 1, 1]
    assert all(math.isfinite(row["loss"]) for row in log)
    # The passage next to it in the batch (and every other) trained exactly as in a run where none diverged.
    assert_same_loras(out, clean_bank, others, atol=0)


def test_encode_sigkill_while_writing_a_shard_resumes_to_the_same_bank(tiny_model, encode_records, clean_bank,
                                                                       encode_batches, tmp_path):
    """Killed half-way through writing the second shard: the index names the first only, and
    --resume_from_checkpoint last ends with the bank of the uninterrupted run."""
    import hashlib

    out = tmp_path / "bank"
    killed = run_stage("encode", "--model_name_or_path", tiny_model, "--input_file", encode_records,
                       "--output_dir", out, *ENCODE, "--shard_size", "2", check=False,
                       env=stage_env(KILL_WHILE_WRITING="-shard-00001.safetensors.tmp",
                                     PYTHONPATH=pythonpath_with_hook(tmp_path, KILL_WHILE_WRITING)))
    assert killed.returncode == -9, killed.stderr[-2000:]
    part = json.loads((out / "index.rank00000.json").read_text())
    assert list(part["shards"]) == ["rank00000-shard-00000.safetensors"]
    assert sorted(part["passages"]) == sorted(encode_batches[0])
    shard = out / "rank00000-shard-00000.safetensors"
    assert hashlib.sha256(shard.read_bytes()).hexdigest() == part["shards"][shard.name]["sha256"]
    assert (out / ".rank00000-shard-00001.safetensors.tmp").exists()  # the half-written one, under its temp name
    assert not (out / "rank00000-shard-00001.safetensors").exists()

    encode_in_process(tiny_model, encode_records, out, "--shard_size", "2", "--resume_from_checkpoint", "last")
    assert not list(out.glob(".*.tmp"))
    assert_same_loras(out, clean_bank, [pid for batch in encode_batches for pid in batch])


def projector_args(tiny_model, records, bank_dir, out, *extra) -> list:
    """2 pairs (one per record), one per step: 2 steps per epoch, a checkpoint every step."""
    return ["--model_name_or_path", tiny_model, "--data_file", records, "--bank_dir", bank_dir, "--output_dir", out,
            "--per_device_train_batch_size", "1", "--max_steps", "4", "--save_steps", "1", "--report_to", "none",
            *extra]


def test_projector_nan_loss_stops_and_keeps_the_last_checkpoint(tiny_model, encode_records, clean_bank, tmp_path):
    from dyprag.projector_model import load_projector

    out = tmp_path / "run"
    result = run_stage("projector",
                       *projector_args(tiny_model, encode_records, clean_bank, out, "--learning_rate", "1e30"),
                       check=False, env=stage_env(OMP_NUM_THREADS="1"))
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("stopped (rank 0): the training loss is nan at step 2; nothing of this step was applied"), \
        last
    assert "--resume_from_checkpoint last" in last and "--nan_policy skip" in last and "Traceback" not in result.stderr
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-1"]
    assert not (out / "projector.safetensors").exists()
    projector = load_projector(out / "checkpoint-1")
    assert all(bool(param.isfinite().all()) for param in projector.parameters())
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["global_step"] == 1


def test_projector_nan_loss_skip_adds_no_gradient(tiny_model, encode_records, clean_bank, tmp_path):
    """Steps 2-4 are skipped; with beta1 0 and no weight decay a zero gradient moves nothing, so the final
    projector is checkpoint-1's exactly."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    run_stage("projector", *projector_args(tiny_model, encode_records, clean_bank, out, "--learning_rate", "1e30",
                                           "--nan_policy", "skip", "--adam_beta1", "0", "--weight_decay", "0"),
              env=stage_env(OMP_NUM_THREADS="1"))
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3, 4]
    assert log[0]["loss"] > 1 and "skipped_batches" not in log[0]
    assert [(row["skipped_batches"], row["loss"]) for row in log[1:]] == [(1, 0), (2, 0), (3, 0)]
    assert json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["skipped_batches"] == 3
    final, first = load_file(out / "projector.safetensors"), load_file(out / "checkpoint-1" / "projector.safetensors")
    assert final.keys() == first.keys() and all(torch.equal(final[key], first[key]) for key in final)


def test_projector_sigkill_while_saving_keeps_the_last_checkpoint_and_resume_matches(tiny_model, encode_records,
                                                                                     clean_bank, tmp_path):
    """SIGKILL half-way through checkpoint-2's optimizer file: checkpoint-1 is intact, the half-written folder stays
    under .saving/, and `--resume_from_checkpoint last` (never the half-written folder) ends as the whole run."""
    from safetensors.torch import load_file

    from dyprag.projector_model import load_projector

    env = stage_env(OMP_NUM_THREADS="1")
    args = projector_args(tiny_model, encode_records, clean_bank, tmp_path / "whole", "--learning_rate", "3e-3")
    run_stage("projector", *args, env=env)

    out = tmp_path / "killed"
    args = projector_args(tiny_model, encode_records, clean_bank, out, "--learning_rate", "3e-3")
    killed = run_stage("projector", *args, check=False,
                       env={**env, "KILL_WHILE_WRITING": ".saving/checkpoint-2/optimizer.safetensors",
                            "PYTHONPATH": pythonpath_with_hook(tmp_path, KILL_WHILE_WRITING)})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-1"]
    assert (out / ".saving" / "checkpoint-2" / "projector.safetensors").exists()  # written before the kill
    load_projector(out / "checkpoint-1")
    load_file(out / "checkpoint-1" / "optimizer.safetensors")

    run_stage("projector", *args, "--resume_from_checkpoint", "last", env=env)
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == [f"checkpoint-{n}" for n in (1, 2, 3, 4)]
    assert not (out / ".saving").exists()
    whole, resumed = load_file(tmp_path / "whole" / "projector.safetensors"), load_file(out / "projector.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert (whole[key] - resumed[key]).abs().max() <= 1e-6, key
    # Steps 1-2 of the killed run, then 2-4 once more from checkpoint-1: the losses of the whole run.
    losses = {row["step"]: row["loss"] for row in map(json.loads, (tmp_path / "whole" / "trainer_log.jsonl")
                                                      .read_text().splitlines())}
    logged = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1, 2, 2, 3, 4]
    assert [row["loss"] for row in logged] == pytest.approx([losses[row["step"]] for row in logged], abs=1e-6)
