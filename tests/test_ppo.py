"""ppo: the policy learns what a reward model wants; the reference stays the starting policy.

A tiny synthetic task that a tiny policy can reach: every prompt is answered "yes" or "no"
(half and half) after sft, and the reward model (trained by the rm stage on chosen "yes" /
rejected "no" pairs) prefers "yes". PPO must move the mean reward from the sft policy's
mixture to the "yes" end within a few dozen updates. Then the chain sft -> rm -> ppo runs
through the launch scripts on two ranks (ZeRO-2; ppo also under ZeRO-3), its policy is taken
by sft's predict and by export, and the three runs share one W&B group; resumed from a
checkpoint it ends where it ended.
A run killed while saving resumes to the uninterrupted run's weights; a NaN loss stops the run or
is skipped. (Bad input: tests/test_user_errors.py.)
"""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import FP16_ON_CPU, ROOT, launch, run_stage, stage_env
from test_reliability import pythonpath_with_hook

QUESTIONS = "river city clock tower blue green red castle bridge garden lamp stone mountain".split()


@pytest.fixture(scope="module")
def yes_no_data(tmp_path_factory) -> Path:
    """yn_sft: random questions answered yes or no at random; yn_pref: chosen yes, rejected no."""
    folder = tmp_path_factory.mktemp("yes_no")
    rng = random.Random(0)
    questions = [f"Is the {rng.choice(QUESTIONS)} {rng.choice(QUESTIONS)}?" for _ in range(160)]
    sft = [{"instruction": q, "output": rng.choice(["yes", "no"])} for q in questions]
    pref = [{"instruction": q, "chosen": "yes", "rejected": "no"} for q in questions]
    (folder / "yn_sft.json").write_text(json.dumps(sft))
    (folder / "yn_pref.json").write_text(json.dumps(pref))
    (folder / "dataset_info.json").write_text(json.dumps({
        "yn_sft": {"file_name": "yn_sft.json"},
        "yn_pref": {"file_name": "yn_pref.json", "ranking": True,
                    "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}}}))
    return folder


@pytest.fixture(scope="module")
def sft_and_rm(tiny_model, yes_no_data, tmp_path_factory) -> tuple[Path, Path]:
    """A full-tuned sft policy answering yes/no half and half, and a LoRA rm preferring yes."""
    work = tmp_path_factory.mktemp("yes_no_runs")
    env = stage_env(OMP_NUM_THREADS="1")
    common = ["--dataset_dir", yes_no_data, "--do_train", "--per_device_train_batch_size", "16",
              "--learning_rate", "1e-2", "--report_to", "none"]
    run_stage("sft", "--model_name_or_path", tiny_model, "--dataset", "yn_sft", "--output_dir", work / "sft",
              "--finetuning_type", "full", "--max_steps", "30", *common, env=env)
    run_stage("rm", "--model_name_or_path", tiny_model, "--dataset", "yn_pref", "--output_dir", work / "rm",
              "--max_steps", "15", *common, env=env)
    return work / "sft", work / "rm"


def _prompt_batch(tokenizer) -> dict[str, torch.Tensor]:
    """Two chat prompts, left-padded so that position -1 is where each answer starts."""
    tokenizer.padding_side = "left"
    messages = [[{"role": "user", "content": f"Is the {a} {b}?"}] for a, b in (("river", "blue"), ("lamp", "red"))]
    return dict(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                              padding=True, return_dict=True))


def test_ppo_learns_and_the_reference_stays_fixed(sft_and_rm, yes_no_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.core.callbacks import read_log

    sft, rm = sft_and_rm
    out = tmp_path / "ppo"
    run_stage("ppo", "--model_name_or_path", sft, "--reward_model", rm, "--dataset", "yn_sft",
              "--dataset_dir", yes_no_data, "--output_dir", out, "--max_steps", "20",
              "--per_device_train_batch_size", "16", "--max_new_tokens", "3", "--ppo_epochs", "2",
              "--learning_rate", "3e-3", "--temperature", "1.0", "--logging_steps", "1", "--sample_steps", "10",
              "--report_to", "none", env=stage_env(OMP_NUM_THREADS="1"))

    records = [r for r in read_log(out) if "objective/scores" in r]
    scores = [r["objective/scores"] for r in records]
    assert len(scores) == 20 and all(math.isfinite(s) for s in scores)
    first, last = sum(scores[:4]) / 4, sum(scores[-4:]) / 4
    # The sft policy answers yes about half the time; PPO moves the batches towards yes: the mean
    # reward of the last updates is clearly above the first ones (a single noisy batch may peak higher).
    assert last > first + 1.0, scores
    # The reference is the starting policy (KL 0 at the first update) and does not move with
    # the policy: the KL grows as the policy leaves it.
    kls = [r["objective/kl"] for r in records]
    assert abs(kls[0]) < 1e-3 and max(kls[-4:]) > 0.05, kls

    # Saved like an sft output: a LoRA adapter + tokenizer; sample tables were written.
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 11} and all("reward" in s and "response" in s for s in samples)

    # Reference = the policy with its adapter disabled = the sft model, logit for logit; the
    # trained policy itself has moved away from it.
    tokenizer = AutoTokenizer.from_pretrained(sft)
    batch = _prompt_batch(tokenizer)
    with torch.no_grad():
        sft_logits = AutoModelForCausalLM.from_pretrained(sft).eval()(**batch).logits
        policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft), out).eval()
        policy_logits = policy(**batch).logits
        with policy.disable_adapter():
            reference_logits = policy(**batch).logits
    torch.testing.assert_close(reference_logits, sft_logits, rtol=0, atol=1e-5)
    assert (policy_logits[:, -1] - sft_logits[:, -1]).abs().max() > 0.1


def test_reward_is_the_value_model_with_its_adapter_off(sft_and_rm):
    """With LoRA, ppo keeps one rm backbone: the reward scores with the value model's backbone, its
    adapter disabled, and a frozen copy of the rm's head, i.e. the rm's own scores exactly, however
    far the value adapter and its head have trained."""
    from transformers import AutoTokenizer
    from trl.experimental.utils import get_reward

    from stages.core.arguments import FinetuningArguments
    from stages.core.loader import load_model
    from stages.ppo import reward_model_args
    from stages.core.ppo_trainer import AdapterOffReward

    _, rm = sft_and_rm
    tokenizer = AutoTokenizer.from_pretrained(rm)
    reward_args = reward_model_args(str(rm))
    reward = load_model(tokenizer, reward_args, FinetuningArguments(), is_trainable=False, add_valuehead=True)
    value = load_model(tokenizer, reward_args, FinetuningArguments(create_new_adapter=True), is_trainable=True,
                       add_valuehead=True)
    shared = AdapterOffReward(value)
    assert [name for name, _ in shared.named_parameters()] == ["score.weight"]  # all TRL prepares and moves
    batch = tokenizer(["Is the river blue? yes", "Is the lamp red? no, it is green"], padding=True,
                      padding_side="right", return_tensors="pt").input_ids
    torch.manual_seed(0)
    with torch.no_grad():
        for param in value.parameters():  # a value model that has trained: every trained tensor moved
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
        rm_scores = get_reward(reward, batch, tokenizer.pad_token_id, 0)[0]
        shared_scores = get_reward(shared, batch, tokenizer.pad_token_id, 0)[0]
        values = get_reward(value.get_base_model(), batch, tokenizer.pad_token_id, 0)[0]
    torch.testing.assert_close(shared_scores, rm_scores, rtol=0, atol=1e-6)
    assert (values - rm_scores).abs().max() > 1e-2  # the value model itself did move


def test_response_logits_equal_the_whole_sequence_slice_in_value_and_gradient(tiny_model):
    """TRL's loop takes `forward(...).logits[:, prompt_width - 1:-1]`; with the hooks on, the LM head runs at those
    positions only and gives the same log-probs and the same LoRA gradients. Outside `active`, and for generation,
    the policy is untouched; any other index of the logits raises."""
    import trl.experimental.ppo.ppo_trainer as trl_ppo
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.utils import selective_log_softmax

    from stages.core.ppo_trainer import ResponseLogits, ResponseLogitsHooks

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    policy = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                            LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    hooks = ResponseLogitsHooks(policy)
    prompts = tokenizer(["Is the river blue?", "Is the old stone bridge green or red?"], padding=True,
                        padding_side="left", return_tensors="pt").input_ids
    width = prompts.shape[1]
    query_responses = torch.cat([prompts, torch.randint(10, 200, (2, 6))], 1)
    query_responses[0, -2:] = tokenizer.pad_token_id  # a response that ended early
    responses = query_responses[:, width:]

    def log_probs_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        policy.zero_grad()
        logits = trl_ppo.forward(policy, query_responses, tokenizer.pad_token_id).logits[:, width - 1:-1]
        logits /= 0.7  # as TRL does, in place
        log_probs = selective_log_softmax(logits, responses)
        log_probs.sum().backward()
        return log_probs.detach(), [p.grad.clone() for p in policy.parameters() if p.requires_grad]

    whole, whole_grads = log_probs_and_grads()
    with hooks.active(width):
        output = trl_ppo.forward(policy, query_responses, tokenizer.pad_token_id)
        assert isinstance(output.logits, ResponseLogits) and output.logits.logits.shape[1] == responses.shape[1]
        with pytest.raises(TypeError, match="supports"):
            output.logits[:, width:]
        response_only, response_grads = log_probs_and_grads()
    torch.testing.assert_close(response_only, whole, rtol=0, atol=1e-5)
    assert len(response_grads) > 4 and all(g.abs().max() > 0 for g in whole_grads)
    for got, expected in zip(response_grads, whole_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # outside `active` the hooks do nothing
        assert isinstance(policy(input_ids=query_responses).logits, torch.Tensor)


def test_rollout_scores_are_trls_and_each_chunk_is_handed_out_once(tiny_model):
    """`generation_by_chunks` samples what TRL's `batch_generation` samples from the same seed (responses and
    scores, chunk by chunk, the last chunk short); TRL's loop reads each chunk once, so a chunk is gone after it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from trl.experimental.ppo.ppo_trainer import batch_generation

    from stages.core.ppo_trainer import generation_by_chunks

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    queries = tokenizer(["Is the river blue?", "Is the lamp red?", "Is the old stone bridge green?", "Is it?",
                         "Is the garden green?"], padding=True, padding_side="left", return_tensors="pt").input_ids
    config = GenerationConfig(max_new_tokens=5, temperature=0.7, top_k=0, top_p=1.0, do_sample=True)
    torch.manual_seed(3)
    expected_responses, expected_scores = batch_generation(model, queries, 2, tokenizer.pad_token_id, config)
    torch.manual_seed(3)
    responses, scores = generation_by_chunks(model, queries, 2, tokenizer.pad_token_id, config)
    assert torch.equal(responses, expected_responses)
    for start in range(0, 5, 2):
        torch.testing.assert_close(scores[start:start + 2], expected_scores[start:start + 2], rtol=0, atol=0)
    with pytest.raises(TypeError, match="once"):
        scores[0:2]
    with pytest.raises(TypeError, match="once"):
        generation_by_chunks(model, queries, 2, tokenizer.pad_token_id, config)[1][1:3]

    class StopsEarlyOnOddChunks:  # chunks whose generation stops early: padded as TRL pads them
        calls = 0

        def generate(self, input_ids, generation_config, **kwargs):
            self.calls += 1
            new = 2 if self.calls % 2 else 4
            scores = tuple(torch.randn(len(input_ids), 7) for _ in range(new))
            return SimpleNamespace(sequences=torch.cat([input_ids, torch.randint(4, 7, (len(input_ids), new))], 1),
                                   scores=scores)

    torch.manual_seed(5)
    expected_responses, expected_scores = batch_generation(StopsEarlyOnOddChunks(), queries, 2, 0, config)
    torch.manual_seed(5)
    responses, scores = generation_by_chunks(StopsEarlyOnOddChunks(), queries, 2, 0, config)
    assert torch.equal(responses, expected_responses) and expected_scores.shape[1] == 4
    for start in range(0, 5, 2):
        torch.testing.assert_close(scores[start:start + 2], expected_scores[start:start + 2], rtol=0, atol=0)


def test_full_tuning_trains_beside_a_frozen_reference_and_reward(sft_and_rm, yes_no_data, tmp_path):
    """Full tuning cannot disable an adapter: the reference and the reward model are frozen copies
    (TRL's default), and the policy is saved as a whole model."""
    from stages.core.callbacks import read_log

    sft, rm = sft_and_rm
    out = tmp_path / "ppo_full"
    run_stage("ppo", "--model_name_or_path", sft, "--reward_model", rm, "--finetuning_type", "full",
              "--dataset", "yn_sft", "--dataset_dir", yes_no_data, "--output_dir", out, "--max_steps", "2",
              "--per_device_train_batch_size", "8", "--max_new_tokens", "3", "--ppo_epochs", "1",
              "--learning_rate", "1e-4", "--logging_steps", "1", "--sample_steps", "0", "--report_to", "none",
              env=stage_env(OMP_NUM_THREADS="1"))
    records = [r for r in read_log(out) if "objective/scores" in r]
    assert len(records) == 2 and all(math.isfinite(r["objective/scores"]) for r in records)
    assert abs(records[0]["objective/kl"]) < 1e-3  # the reference is the starting policy
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()


# Reliability: the PPO loop is TRL's; the hooks below reach into it the way a crash or a bad batch would.
PPO_SHORT = ["--dataset", "yn_sft", "--per_device_train_batch_size", "8", "--max_new_tokens", "3", "--ppo_epochs",
             "2", "--learning_rate", "3e-3", "--temperature", "1.0", "--logging_steps", "1", "--sample_steps", "2",
             "--save_steps", "1", "--max_steps", "4", "--report_to", "none"]

KILL_DURING_SAVE = """
import os
import signal

import safetensors.torch

save_file = safetensors.torch.save_file


def dying_save(tensors, filename, *args, **kwargs):  # checkpoint-2's policy and weights are written by now
    save_file(tensors, filename, *args, **kwargs)
    if os.path.join(".saving", "checkpoint-2", "optimizer") in str(filename):
        os.kill(os.getpid(), signal.SIGKILL)


safetensors.torch.save_file = dying_save
"""

POISON_ONE_BATCH = """
import os

import torch
import trl.experimental.ppo.ppo_trainer as ppo

forward, calls = ppo.forward, [0]


def poisoned_forward(model, query_responses, pad_token_id):  # rollouts run without grad, PPO micro-batches with
    output = forward(model, query_responses, pad_token_id)
    if torch.is_grad_enabled():
        calls[0] += 1
        if calls[0] == int(os.environ["POISON_CALL"]):  # (policy output, values): the values turn NaN
            output = output[0], output[1] * float("nan")
    return output


ppo.forward = poisoned_forward
"""


def _ppo_runs(runs: dict[str, tuple[list, dict]]) -> dict[str, subprocess.CompletedProcess]:
    """Independent ppo runs side by side (one per core): name -> (args, extra environment)."""
    from concurrent.futures import ThreadPoolExecutor

    def run(item):
        args, extra = item
        return run_stage("ppo", *args, check=False, env=stage_env(OMP_NUM_THREADS="1", **extra))

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(runs, pool.map(run, runs.values())))


def _assert_same_tensors(whole: Path, resumed: Path, names: tuple[str, ...]) -> None:
    """Each safetensors file `names` holds the same tensors (within 1e-6) in both runs."""
    from safetensors.torch import load_file

    for name in names:
        expected, got = load_file(whole / name), load_file(resumed / name)
        assert expected.keys() == got.keys() and expected, name
        assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-6, name


def test_sigkill_while_saving_then_resume_matches_the_uninterrupted_run(sft_and_rm, yes_no_data, tmp_path):
    """Killed while writing checkpoint-2: checkpoint-1 stays whole, and resuming from it ends where a run
    that was never interrupted ends (policy, value model, Adam moments, the logged rewards)."""
    from stages.core.callbacks import read_log

    sft, rm = sft_and_rm
    args = ["--model_name_or_path", sft, "--reward_model", rm, "--dataset_dir", yes_no_data, *PPO_SHORT]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    kill = {"PYTHONPATH": pythonpath_with_hook(tmp_path, KILL_DURING_SAVE)}
    results = _ppo_runs({"whole": ([*args, "--output_dir", whole], {}),
                         "killed": ([*args, "--output_dir", killed], kill)})
    assert results["whole"].returncode == 0, results["whole"].stderr[-3000:]
    assert results["killed"].returncode == -9, results["killed"].stderr[-3000:]
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (killed / "adapter_model.safetensors").exists()
    run_stage("ppo", *args, "--output_dir", killed, "--resume_from_checkpoint", "last",
              env=stage_env(OMP_NUM_THREADS="1"))
    _assert_same_tensors(whole, killed, ("adapter_model.safetensors", "checkpoint-4/trained_weights.safetensors",
                                         "checkpoint-4/optimizer.safetensors"))
    # The resumed log continues the killed one with the updates the whole run logged (2 was
    # logged before the kill and again after the resume).
    rewards = {r["step"]: r["objective/scores"] for r in read_log(whole) if "objective/scores" in r}
    resumed = [(r["step"], r["objective/scores"]) for r in read_log(killed) if "objective/scores" in r]
    assert [step for step, _ in resumed] == [1, 2, 2, 3, 4]
    assert all(abs(rewards[step] - score) <= 1e-5 for step, score in resumed)
    assert json.loads((killed / "trainer_state.json").read_text())["global_step"] == 4


def test_nan_loss_stops_or_is_skipped(sft_and_rm, yes_no_data, tmp_path):
    """A NaN in the first PPO micro-batch of update 2: stop keeps checkpoint-1 and writes no policy; skip
    finishes, counts the batch, and leaves finite weights."""
    from safetensors.torch import load_file

    from stages.core.callbacks import read_log

    sft, rm = sft_and_rm
    args = ["--model_name_or_path", sft, "--reward_model", rm, "--dataset_dir", yes_no_data, *PPO_SHORT]
    poison = {"PYTHONPATH": pythonpath_with_hook(tmp_path, POISON_ONE_BATCH), "POISON_CALL": "3"}  # 2 per update
    stop, skip = tmp_path / "stop", tmp_path / "skip"
    results = _ppo_runs({"stop": ([*args, "--output_dir", stop], poison),
                         "skip": ([*args, "--output_dir", skip, "--nan_policy", "skip"], poison)})
    stopped = results["stop"]
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith("stopped (rank 0): the PPO loss is nan at update 2"), last
    assert "--nan_policy skip" in last and "Traceback" not in stopped.stderr
    assert sorted(p.name for p in stop.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (stop / "adapter_model.safetensors").exists()

    assert results["skip"].returncode == 0, results["skip"].stderr[-3000:]
    logged = {r["step"]: r.get("skipped_batches") for r in read_log(skip) if "objective/scores" in r}
    assert logged == {1: None, 2: 1, 3: 1, 4: 1}
    assert all(bool(t.isfinite().all()) for t in load_file(skip / "adapter_model.safetensors").values())


CHAIN_ARGS = ["--per_device_train_batch_size", "4", "--logging_steps", "1", "--report_to", "wandb",
              "--wandb_group", "chain-7"]


def _chain_env(wandb_dir: Path, zero: str = "zero2") -> dict[str, str]:
    return {"DS_CONFIG": str(ROOT / "ds_configs" / f"{zero}.json"), "WANDB_DIR": str(wandb_dir),
            "WANDB_PROJECT": "stages-test"}


@pytest.fixture(scope="module")
def chain_sft_rm(tiny_model, yes_no_data, tmp_path_factory) -> dict[str, Path]:
    """sft then rm through the launch scripts (2 ranks, ZeRO-2), logging to one W&B group."""
    work = tmp_path_factory.mktemp("chain")
    wandb_dir = work / "wandb"
    wandb_dir.mkdir()
    env = _chain_env(wandb_dir)
    sft, rm = work / "sft", work / "rm"
    launch("sft", "--model_name_or_path", tiny_model, "--dataset", "yn_sft", "--dataset_dir", yes_no_data,
           "--output_dir", sft, "--do_train", "--max_steps", "4", "--learning_rate", "1e-2", *CHAIN_ARGS, **env)
    # The rm starts from the sft policy: the sft adapter is merged, the value head gets a new one.
    launch("rm", "--model_name_or_path", tiny_model, "--adapter_name_or_path", sft, "--dataset", "yn_pref",
           "--dataset_dir", yes_no_data, "--val_size", "16", "--output_dir", rm, "--do_train", "--do_eval",
           "--max_steps", "4", "--learning_rate", "1e-2", *CHAIN_ARGS, **env)
    return {"sft": sft, "rm": rm, "wandb": wandb_dir}


def _chain_ppo_args(tiny_model: Path, yes_no_data: Path, chain_sft_rm: dict[str, Path]) -> list:
    return ["--model_name_or_path", tiny_model, "--adapter_name_or_path", chain_sft_rm["sft"], "--reward_model",
            chain_sft_rm["rm"], "--dataset", "yn_sft", "--dataset_dir", yes_no_data, "--max_steps", "3",
            "--save_steps", "1", "--max_new_tokens", "3", "--ppo_epochs", "1", "--sample_steps", "2", *CHAIN_ARGS]


@pytest.mark.slow
def test_chain_sft_rm_ppo_two_ranks(tiny_model, yes_no_data, chain_sft_rm, tmp_path):
    """sft -> rm -> ppo through the launch scripts (2 ranks, ZeRO-2), one W&B group.

    pt is left out of the chain to keep CI short: its output is a plain model directory, which
    is what sft starts from here, and test_distributed runs pt on two ranks.
    """
    from test_wandb import read_wandb_records
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.core.callbacks import read_log
    from stages.core.arguments import FinetuningArguments, ModelArguments
    from stages.core.loader import load_model, load_tokenizer

    wandb_dir = chain_sft_rm["wandb"]
    env = _chain_env(wandb_dir)
    base, sft, ppo = tiny_model, chain_sft_rm["sft"], tmp_path / "ppo"
    ppo_args = _chain_ppo_args(tiny_model, yes_no_data, chain_sft_rm)
    launch("ppo", *ppo_args, "--output_dir", ppo, **env)

    records = [r for r in read_log(ppo) if "objective/scores" in r]
    assert len(records) == 3 and all(math.isfinite(r["objective/scores"]) for r in records)
    assert abs(records[0]["objective/kl"]) < 1e-3  # the reference is the sft policy the run started from
    assert json.loads((ppo / "deepspeed_config.json").read_text())["train_batch_size"] == 8  # 2 ranks x 4
    assert (ppo / "adapter_model.safetensors").is_file() and not (ppo / "training_args.bin").exists()

    # Resumed from checkpoint-1 in another folder (as after a crash) on the same two ranks: the ZeRO-2
    # partitions of the weights and Adam moments are put back, and the run ends where this one did.
    resumed = tmp_path / "ppo_resumed"
    shutil.copytree(ppo / "checkpoint-1", resumed / "checkpoint-1")
    launch("ppo", *ppo_args, "--output_dir", resumed, "--resume_from_checkpoint", "last",
           **{**env, "WANDB_DIR": str(tmp_path)})  # its W&B run is kept apart from the group checked below
    _assert_same_tensors(ppo, resumed, ("adapter_model.safetensors", "checkpoint-3/optimizer.safetensors"))

    # One W&B group for the three stages; the ppo run logs its metrics and sample tables.
    runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 3, runs
    by_job = {}
    for folder in runs:
        records_ = list(read_wandb_records(next(folder.glob("*.wandb"))))
        run = next(r.run for r in records_ if r.WhichOneof("record_type") == "run")
        assert run.run_group == "chain-7"
        keys = {item.key or "/".join(item.nested_key) for r in records_ if r.WhichOneof("record_type") == "history"
                for item in r.history.item}
        by_job[run.job_type] = keys
    assert set(by_job) == {"sft", "rm", "ppo"}
    assert {"train/loss", "eval/accuracy", "eval/margin"} <= by_job["rm"], by_job["rm"]
    assert {"train/objective/scores", "train/objective/kl", "train/objective/entropy", "train/loss/value_avg",
            "train/policy/clipfrac_avg", "train/val/clipfrac_avg", "ppo/samples/_type"} <= by_job["ppo"], by_job["ppo"]
    assert list((runs[0].parent).glob("*/files/media/table/ppo/samples_*.table.json"))

    # The policy is an sft output: sft's predict_with_generate and export take it (stacked on sft).
    stacked = f"{sft},{ppo}"
    run_stage("sft", "--model_name_or_path", base, "--adapter_name_or_path", stacked, "--eval_dataset", "yn_sft",
              "--dataset_dir", yes_no_data, "--max_samples", "4", "--output_dir", tmp_path / "predict",
              "--do_predict", "--predict_with_generate", "--max_new_tokens", "3", "--report_to", "none")
    predictions = (tmp_path / "predict" / "generated_predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 4
    run_stage("export", "--model_name_or_path", base, "--adapter_name_or_path", stacked,
              "--export_dir", tmp_path / "merged")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    batch = _prompt_batch(tokenizer)
    ours = load_model(load_tokenizer(ModelArguments(model_name_or_path=str(base))),
                      ModelArguments(model_name_or_path=str(base), adapter_name_or_path=stacked),
                      FinetuningArguments(), is_trainable=False)
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(**batch).logits
        torch.testing.assert_close(ours(**batch).logits, merged_logits, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_ppo_zero3_two_ranks_saves_and_resumes(tiny_model, yes_no_data, chain_sft_rm, tmp_path):
    """ppo under ZeRO-3 (policy, value model and reward model partitioned over two ranks): it trains, its
    checkpoint holds whole tensors, and resuming from checkpoint-1 ends where the uninterrupted run ended."""
    from stages.core.callbacks import read_log

    env = _chain_env(tmp_path, "zero3")  # its own W&B folder: the chain test counts the runs of its group
    ppo, resumed = tmp_path / "ppo", tmp_path / "ppo_resumed"
    ppo_args = _chain_ppo_args(tiny_model, yes_no_data, chain_sft_rm)
    launch("ppo", *ppo_args, "--output_dir", ppo, **env)
    records = [r for r in read_log(ppo) if "objective/scores" in r]
    assert len(records) == 3 and all(math.isfinite(r["objective/scores"]) for r in records)
    assert json.loads((ppo / "deepspeed_config.json").read_text())["zero_optimization"]["stage"] == 3
    saved = {p.name for p in (ppo / "checkpoint-1").iterdir()}
    assert {"trained_weights.safetensors", "optimizer.safetensors"} <= saved, saved

    shutil.copytree(ppo / "checkpoint-1", resumed / "checkpoint-1")
    launch("ppo", *ppo_args, "--output_dir", resumed, "--resume_from_checkpoint", "last", **env)
    _assert_same_tensors(ppo, resumed, ("adapter_model.safetensors", "checkpoint-3/trained_weights.safetensors",
                                        "checkpoint-3/optimizer.safetensors"))


@pytest.mark.slow
def test_ppo_fp16_resumes_exactly(tiny_model, yes_no_data, chain_sft_rm, tmp_path):
    """ppo in fp16 under ZeRO-2 (made available on these CPU ranks by helpers.FP16_ON_CPU), resumed from a
    checkpoint after real updates, ends where the uninterrupted run ended.

    Two things besides the fp32 weights: DeepSpeed builds its fp32 master from the weights cast to fp16, so
    the saved values must go into the master again (resumed from a rounded master, the first update
    already differed by ~1e-4, in bf16 too); and the dynamic loss scale, which comes back from ppo_state.json.

    Where the gradients overflow depends on the machine and the run: the first update went through at 2^15 in one
    run here, at 2^14 in another and on another CPU, at 2^17 in a third. With a scale window of 1 the scale halves
    on every overflow and doubles on every overflow-free update but the first after one, so from 2^16 it moves to
    this run's overflow threshold and then keeps skipping updates there. Every update is saved, and the run resumes
    from the first checkpoint after a real update whose scale is no longer the initial one: a resumed run that
    started again from 2^16 would skip other updates."""
    config = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    config["fp16"] = {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16, "hysteresis": 1,
                      "loss_scale_window": 1, "min_loss_scale": 1}
    (tmp_path / "ds.json").write_text(json.dumps(config))
    env = {**_chain_env(tmp_path), "DS_CONFIG": str(tmp_path / "ds.json"),
           "PYTHONPATH": pythonpath_with_hook(tmp_path, FP16_ON_CPU)}
    ppo, resumed = tmp_path / "ppo", tmp_path / "ppo_resumed"
    ppo_args = [*_chain_ppo_args(tiny_model, yes_no_data, chain_sft_rm), "--fp16", "true", "--max_steps", "6",
                "--save_steps", "1"]
    launch("ppo", *ppo_args, "--output_dir", ppo, **env)
    states = {n: json.loads((ppo / f"checkpoint-{n}" / "ppo_state.json").read_text()) for n in range(1, 7)}
    updated = [n for n, state in states.items()
               if state["optimizer_step"] and state["loss_scale"]["cur_scale"] != 2 ** 16]
    assert updated and updated[0] < 6, states
    middle, last = states[updated[0]], states[6]
    assert last["optimizer_step"] > middle["optimizer_step"], states

    shutil.copytree(ppo / f"checkpoint-{updated[0]}", resumed / f"checkpoint-{updated[0]}")
    launch("ppo", *ppo_args, "--output_dir", resumed, "--resume_from_checkpoint", "last", **env)
    _assert_same_tensors(ppo, resumed, ("adapter_model.safetensors", "checkpoint-6/trained_weights.safetensors",
                                        "checkpoint-6/optimizer.safetensors"))
    assert json.loads((resumed / "checkpoint-6" / "ppo_state.json").read_text())["loss_scale"] == last["loss_scale"]


@pytest.mark.parametrize("stage", ["ppo", "sft"])
def test_old_top_k_spelling_is_the_sampling_top_k_with_a_notice(stage, capsys):
    """--top_k is the passages per question elsewhere; ppo's and sft's sampling top-k is --sampling_top_k, and
    the old spelling keeps working for one release, with one line naming the new flag."""
    from stages.core.arguments import GeneratingArguments, parse_args
    from stages.core.arguments import PPOArguments

    arg_type = PPOArguments if stage == "ppo" else GeneratingArguments
    (args,) = parse_args([arg_type], ["--top_k", "5"], stage)
    assert args.sampling_top_k == 5
    assert capsys.readouterr().err.count("--top_k is renamed --sampling_top_k; the old name is accepted until the "
                                         "next release.") == 1
    (args,) = parse_args([arg_type], ["--sampling_top_k", "7"], stage)
    assert args.sampling_top_k == 7 and "renamed" not in capsys.readouterr().err
    if stage == "sft":  # generate() takes it as top_k
        assert GeneratingArguments(do_sample=True, sampling_top_k=7).to_generate_kwargs()["top_k"] == 7
