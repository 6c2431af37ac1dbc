"""Golden losses: each training stage (pt, sft, rm, ppo, encode, projector), run 2-3 steps in fp32 on the CPU
from a fixed seed on the tiny model and the demo data, logs the losses recorded here.

A change to what a stage computes (data order, tokenization, masking, the loss, the optimizer, the
learning-rate schedule, initialisation, the PPO rollout and reward) moves them; a refactor that keeps
the behaviour keeps them. The tolerance (rel 1e-3) holds on every CPU: AVX2 and AVX512 kernels sum in
other orders, which moves these fp32 values in their last digits only. To record new values after an
intended change, run this file with -s: each check prints the values it read.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import run_stage, stage_env

REL = 1e-3
STEPS = ["--max_steps", "3", "--logging_steps", "1", "--seed", "0", "--report_to", "none"]
TRAINER = ["--per_device_train_batch_size", "4", "--cutoff_len", "64", *STEPS]


def _run(stage: str, *args: str | Path) -> None:
    """One process, one thread: the same summation order on every run of this machine."""
    run_stage(stage, *args, env=stage_env(OMP_NUM_THREADS="1"))


def _check(out: Path, key: str, golden: list[float]) -> None:
    """`key` of every row of OUT/trainer_log.jsonl that has it, against the golden values."""
    from stages.core.callbacks import read_log

    values = [row[key] for row in read_log(out) if key in row]
    print(f"{out.name} {key}: {[float(f'{x:.5g}') for x in values]}")
    assert values == pytest.approx(golden, rel=REL), (key, values)


@pytest.fixture(scope="module")
def rm_run(tiny_model: Path, demo_data: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("golden") / "rm"
    _run("rm", "--model_name_or_path", tiny_model, "--dataset", "demo_pref", "--dataset_dir", demo_data,
         "--max_samples", "12", "--output_dir", out, "--do_train", "--learning_rate", "1e-2", *TRAINER)
    return out


@pytest.fixture(scope="module")
def encode_run(tiny_model: Path, demo_data: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("golden") / "encode"
    _run("encode", "--model_name_or_path", tiny_model, "--input_file", demo_data / "demo_qa.json",
         "--output_dir", out, "--max_samples", "2", "--passages_per_batch", "3", "--learning_rate", "1e-2",
         "--num_train_epochs", "3", "--report_to", "none")
    return out


@pytest.mark.parametrize("stage, dataset, samples, losses, grad_norms", [
    # pt: packed blocks of demo_pt, the causal-LM loss on every token
    ("pt", "demo_pt", "24", [7.4638, 7.3982, 7.3203], [1.7180, 1.7757, 1.7925]),
    # sft: demo_sft, the loss on the answers only
    ("sft", "demo_sft", "12", [7.4189, 7.3309, 7.2570], [2.4614, 2.2087, 5.5753]),
])
def test_trainer_stage_golden_losses(stage, dataset, samples, losses, grad_norms, tiny_model, demo_data, tmp_path):
    """pt and sft with every weight tuned: the loss and gradient norm of 3 steps."""
    out = tmp_path / stage
    _run(stage, "--model_name_or_path", tiny_model, "--dataset", dataset, "--dataset_dir", demo_data,
         "--max_samples", samples, "--output_dir", out, "--do_train", "--finetuning_type", "full",
         "--learning_rate", "1e-3", *TRAINER)
    _check(out, "loss", losses)
    _check(out, "grad_norm", grad_norms)


def test_rm_golden_losses(rm_run):
    """rm (LoRA and a fresh value head on demo_pref): the pairwise ranking loss and gradient norm of 3 steps."""
    _check(rm_run, "loss", [0.69262, 0.48309, 0.54735])
    _check(rm_run, "grad_norm", [1.6403, 1.8759, 1.4461])


def test_ppo_golden_losses(tiny_model, demo_data, rm_run, tmp_path):
    """ppo (LoRA policy on demo_sft's prompts, the rm above as reward and value model, seeded sampling): the
    value loss and the rollouts' reward of 3 updates."""
    out = tmp_path / "ppo"
    _run("ppo", "--model_name_or_path", tiny_model, "--reward_model", rm_run, "--dataset", "demo_sft",
         "--dataset_dir", demo_data, "--output_dir", out, "--per_device_train_batch_size", "4",
         "--max_new_tokens", "4", "--ppo_epochs", "1", "--learning_rate", "1e-3", "--sample_steps", "0", *STEPS)
    _check(out, "loss/value_avg", [0.47441, 1.1398, 1.0363])
    _check(out, "objective/scores", [1.9396, 1.2842, 0.39565])


def test_encode_golden_losses(encode_run):
    """encode (one LoRA per passage of 2 demo_qa records, trained on the passage text, 3 epochs): the mean
    last- and first-epoch loss of each batch of 3 passages."""
    _check(encode_run, "loss", [7.0890, 7.0575])
    _check(encode_run, "first_epoch_loss", [7.4585, 7.4340])


def test_projector_golden_losses(tiny_model, demo_data, encode_run, tmp_path):
    """projector (the hypernetwork trained on the 2 records' passages and encode's LoRAs above): the total loss
    of 3 steps."""
    out = tmp_path / "projector"
    _run("projector", "--model_name_or_path", tiny_model, "--data_file", demo_data / "demo_qa.json",
         "--max_samples", "2", "--bank_dir", encode_run, "--output_dir", out, "--learning_rate", "3e-3",
         "--per_device_train_batch_size", "2", *STEPS)
    _check(out, "loss", [10.432, 9.0358, 7.8417])
