"""Two ranks through the real DeepSpeed launcher on CPU (gloo): sft with LoRA under ZeRO-2/3, pt.

Each sft run learns a small fixed batch, then the test checks what a user relies on: the loss
went down, the two ranks split the data, only the adapter changed (the base on disk is
untouched; a merged export differs from the base only in the LoRA-targeted layers), and the
saved adapter gives, with plain `peft`, the logits of the project's own loader and of the
merged export, and the evaluation loss the run measured on its DeepSpeed engine.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from helpers import FP16_ON_CPU, ROOT, free_port, launch, remove_shared_memory_left, run_stage, stage_env
from test_reliability import pythonpath_with_hook

pytestmark = pytest.mark.slow

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sft_args(tiny_model: Path, demo_data: Path, out: Path) -> list[str]:
    # 8 rows, 4 per rank: every step sees the same global batch, so the loss falls smoothly. The
    # evaluation (one row per rank and step, each row's own token mean) gives eval_loss = the mean
    # of the 8 row losses; with tokens averaged across devices it would weight rows by the length
    # of whichever row the other rank held in the same step.
    return ["--model_name_or_path", tiny_model, "--dataset", "demo_sft", "--dataset_dir", demo_data,
            "--max_samples", "8", "--cutoff_len", "128", "--output_dir", out, "--do_train", "--max_steps", "30",
            "--learning_rate", "1e-2", "--per_device_train_batch_size", "4", "--logging_steps", "1",
            "--eval_dataset", "demo_sft", "--do_eval", "--per_device_eval_batch_size", "1",
            "--average_tokens_across_devices", "false", "--report_to", "none"]


def _fixed_batch(tokenizer) -> dict[str, torch.Tensor]:
    texts = ["What did the cartographer invent?", "A short entry about a city and its country."]
    return tokenizer(texts, return_tensors="pt", padding=True)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _eval_rows(tiny_model: Path, demo_data: Path, out: Path) -> list[dict]:
    """The rows the run evaluated on, tokenized by the project's own pipeline."""
    from transformers import Seq2SeqTrainingArguments

    from stages.core.data import get_dataset
    from stages.core.data.processors import supervised
    from stages.core.data.template import get_template
    from stages.core.arguments import DataArguments, ModelArguments, parse_args
    from stages.core.loader import load_tokenizer

    model_args, data_args, training_args = parse_args(
        [ModelArguments, DataArguments, Seq2SeqTrainingArguments],
        ["--model_name_or_path", str(tiny_model), "--eval_dataset", "demo_sft", "--dataset_dir", str(demo_data),
         "--max_samples", "8", "--cutoff_len", "128", "--output_dir", str(out / "eval_rows"), "--do_predict"],
        "sft")
    tokenizer = load_tokenizer(model_args)
    encode = partial(supervised, tokenizer=tokenizer, template=get_template(tokenizer, data_args.template),
                     cutoff_len=data_args.cutoff_len, train_on_prompt=False)
    return list(get_dataset(data_args, training_args, encode).eval_dataset)


@pytest.fixture(scope="module")
def base_snapshot(tiny_model):
    """The tiny base as plain transformers loads it, and its weights file hash, before any run."""
    from transformers import AutoModelForCausalLM

    state = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(tiny_model).state_dict().items()}
    return state, _sha256(tiny_model / "model.safetensors")


@pytest.mark.parametrize("zero, how", [("zero2", "bash launch/sft.sh"), ("zero3", "deepspeed launch/sft.sh")])
def test_sft_lora_two_ranks(zero, how, tiny_model, demo_data, base_snapshot, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.core.callbacks import read_log
    from stages.core.arguments import FinetuningArguments, ModelArguments
    from stages.core.loader import load_model, load_tokenizer

    out = tmp_path / "sft"
    args = _sft_args(tiny_model, demo_data, out)
    if how.startswith("bash"):  # the bash side of the script: ranks and config from the environment
        launch("sft", *args, nproc=2, DS_CONFIG=str(ROOT / "ds_configs" / f"{zero}.json"))
    else:  # the file given to the DeepSpeed launcher exactly as a user types it
        env = stage_env(OMP_NUM_THREADS="1")
        env.pop("DS_CONFIG", None)
        port = free_port()
        command = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "launch/sft.sh",
                   *map(str, args), "--deepspeed", f"ds_configs/{zero}.json"]
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        output = result.stdout + result.stderr
        first_error = output[output.find("Traceback"):][:4000] if "Traceback" in output else output[-4000:]
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{first_error}"
        assert not remove_shared_memory_left(port), "the run left DeepSpeed's shared memory behind"

    config = json.loads((out / "run_config.json").read_text())
    assert Path(config["deepspeed"]).name == f"{zero}.json"

    # The run learnt, and the two ranks split the data: 8 rows / (2 ranks x 4) = one epoch per step.
    records = read_log(out)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, losses
    assert records[0]["epoch"] == pytest.approx(1.0)

    # Only the adapter was trained: it holds LoRA weights only, every lora_B moved away from its
    # zero init, the base on disk is unchanged and no full weights were written.
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter), sorted(adapter)[:5]
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    num_layers = len({k.split("layers.")[1].split(".")[0] for k in lora_b})
    assert len(lora_b) == num_layers * len(LORA_MODULES)
    assert all(v.abs().sum() > 0 for v in lora_b.values())
    assert not (out / "model.safetensors").exists()
    reference, digest = base_snapshot
    assert _sha256(tiny_model / "model.safetensors") == digest
    base_state = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert base_state.keys() == reference.keys()
    assert all(torch.equal(base_state[k], reference[k]) for k in reference)

    # The adapter loads with plain peft and gives the logits of the project's own loader.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    batch = _fixed_batch(tokenizer)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out).eval()
    plain_logits = _logits(plain, batch)
    ours = load_model(load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model))),
                      ModelArguments(model_name_or_path=str(tiny_model), adapter_name_or_path=str(out)),
                      FinetuningArguments(), is_trainable=False)
    torch.testing.assert_close(_logits(ours, batch), plain_logits, rtol=0, atol=1e-5)
    base_logits = _logits(AutoModelForCausalLM.from_pretrained(tiny_model).eval(), batch)
    assert (plain_logits - base_logits).abs().max() > 1e-2  # the adapter does something

    # ... and reproduces the evaluation loss the run measured on its (partitioned) engine.
    eval_loss = json.loads((out / "eval_results.json").read_text())["eval_loss"]
    rows = _eval_rows(tiny_model, demo_data, tmp_path)
    assert len(rows) == 8
    with torch.no_grad():
        row_losses = [plain(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss
                      for r in rows]
    assert torch.stack(row_losses).mean().item() == pytest.approx(eval_loss, rel=1e-4)

    if zero != "zero3":
        return
    # The merged export loads with plain transformers, gives the same logits, and differs from the
    # base only in the LoRA-targeted linear layers (embeddings, norms and lm_head are untouched).
    merged_dir = tmp_path / "merged"
    run_stage("export", "--model_name_or_path", tiny_model, "--adapter_name_or_path", out,
              "--export_dir", merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    torch.testing.assert_close(_logits(merged, batch), plain_logits, rtol=0, atol=1e-4)
    merged_state = merged.state_dict()
    assert merged_state.keys() == reference.keys()
    for name, weight in reference.items():
        targeted = any(f".{module}." in name for module in LORA_MODULES)
        assert torch.equal(merged_state[name], weight) != targeted, name


def _assert_resumed_like_whole(whole: Path, resumed: Path) -> None:
    """The resumed run ends with the uninterrupted run's weights, and no checkpoint holds a pickle."""
    from safetensors.torch import load_file

    pickles = [str(p) for p in [*whole.rglob("*"), *resumed.rglob("*")]
               if p.suffix in (".pt", ".pth", ".bin", ".pkl") or p.name.startswith("global_step")]
    assert not pickles, pickles
    for checkpoint in whole.glob("checkpoint-*"):
        names = {p.name for p in checkpoint.iterdir()}
        assert {"trained_weights.safetensors", "optimizer.json", "scheduler.json"} <= names, checkpoint
        assert "optimizer.safetensors" in names or "optimizer_rank0.safetensors" in names, checkpoint
    weights = "adapter_model.safetensors" if (whole / "adapter_model.safetensors").is_file() else "model.safetensors"
    expected, got = load_file(whole / weights), load_file(resumed / weights)
    assert expected.keys() == got.keys()
    for key in expected:
        assert (expected[key] - got[key]).abs().max() <= 1e-6, key


@pytest.mark.parametrize("zero, finetuning_type, bf16, optim", [
    ("zero2", "lora", "false", "sgd"), ("zero2", "full", "true", "rmsprop"), ("zero0", "full", "true", "adamw_torch")])
def test_pt_two_ranks_with_eval_resumes_from_its_checkpoint(tiny_model, demo_data, tmp_path, zero, finetuning_type,
                                                            bf16, optim):
    """Two ranks: eval metrics; checkpoint-2 of 4 (whole tensors, no pickles) resumes to the same weights. Full
    fine-tuning has two param groups (weight decay and none); bf16 keeps fp32 masters apart from the weights
    (ZeRO-2: partitions of a flat master; without ZeRO: DeepSpeed's bf16 optimizer holds one copy per weight).
    The optimizer state saved is whatever the optimizer keeps per element: SGD's momentum buffer (and no step
    count), RMSprop's square_avg, momentum buffer and step count, Adam's two moments and step count (one per
    weight here: a step count shared between them would be advanced once per weight)."""
    from stages.core.callbacks import read_log

    out = tmp_path / "pt"
    args = ["--model_name_or_path", tiny_model, "--dataset", "demo_pt", "--dataset_dir", demo_data,
            "--max_samples", "64", "--cutoff_len", "64", "--val_size", "8", "--do_train", "--max_steps", "4",
            "--save_steps", "2", "--learning_rate", "1e-3", "--per_device_train_batch_size", "2",
            "--logging_steps", "1", "--report_to", "none", "--finetuning_type", finetuning_type, "--bf16", bf16,
            "--optim", optim, *(["--optim_args", "momentum=0.9"] if optim != "adamw_torch" else [])]
    launch("pt", *args, "--output_dir", out, "--do_eval", nproc=2, DS_CONFIG=str(ROOT / "ds_configs" / f"{zero}.json"))

    losses = [r["loss"] for r in read_log(out) if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    metrics = json.loads((out / "eval_results.json").read_text())
    assert math.isfinite(metrics["eval_loss"])
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-9)

    from safetensors import safe_open

    with safe_open(out / "checkpoint-2" / "optimizer.safetensors", "pt") as saved:
        kinds = {name.rsplit(".", 1)[1] for name in saved.keys()}
    assert kinds == {"adamw_torch": {"exp_avg", "exp_avg_sq"}, "rmsprop": {"square_avg", "momentum_buffer"},
                     "sgd": {"momentum_buffer"}}[optim]
    resumed = tmp_path / "resumed"
    launch("pt", *args, "--output_dir", resumed, "--resume_from_checkpoint", out / "checkpoint-2", nproc=2,
           DS_CONFIG=str(ROOT / "ds_configs" / f"{zero}.json"))
    _assert_resumed_like_whole(out, resumed)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_pt_two_ranks_mixed_precision_state_resumes(tiny_model, demo_data, tmp_path, precision):
    """ZeRO-2 in half precision: checkpoints hold the fp32 masters and what else DeepSpeed keeps, whole and
    without pickles, and a run resumed after real steps ends with the uninterrupted run's weights.

    - fp16 (made available on these CPU ranks by helpers.FP16_ON_CPU): the dynamic loss scale. The
      initial scale 2^20 overflows the first steps' gradients, and each overflow halves it and skips the
      step, so the checkpoint holds a smaller scale: a resumed run that started again from 2^20 would skip
      other steps than the uninterrupted run and end with other weights. How many steps overflow depends
      on this machine's gradients (two here), so the run resumes from the first checkpoint after a real
      step.
    - bf16, with the optimizer and scheduler built from the config's "optimizer" section (torch's AdamW):
      accelerate then wraps the scheduler, and the resume restores it through that wrapper.
    """
    from safetensors.torch import load_file

    from stages.core.callbacks import read_log

    config = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    if precision == "fp16":
        config["fp16"] = {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 20, "hysteresis": 1,
                          "loss_scale_window": 1000, "min_loss_scale": 1}
    else:
        config["optimizer"] = {"type": "AdamW", "params": {
            **dict.fromkeys(("lr", "betas", "eps", "weight_decay"), "auto"), "torch_adam": True}}
    (tmp_path / "ds.json").write_text(json.dumps(config))
    env = {"DS_CONFIG": str(tmp_path / "ds.json"), "PYTHONPATH": pythonpath_with_hook(tmp_path, FP16_ON_CPU)}
    out = tmp_path / "pt"
    args = ["--model_name_or_path", tiny_model, "--dataset", "demo_pt", "--dataset_dir", demo_data,
            "--max_samples", "64", "--cutoff_len", "64", "--do_train", "--max_steps", "8", "--save_steps", "2",
            "--learning_rate", "1e-3", "--per_device_train_batch_size", "2", "--logging_steps", "1",
            "--report_to", "none", "--finetuning_type", "full", f"--{precision}", "true"]
    launch("pt", *args, "--output_dir", out, nproc=2, **env)

    states = {n: json.loads((out / f"checkpoint-{n}" / "optimizer.json").read_text()) for n in (2, 4, 6)}
    stepped = [n for n, state in states.items() if state["step"]]
    assert stepped, states
    checkpoint, saved = out / f"checkpoint-{stepped[0]}", states[stepped[0]]
    # The checkpoint holds fp32 masters (not the half-precision weights) after real steps.
    weights = load_file(checkpoint / "trained_weights.safetensors")
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert weights and all(w.dtype == torch.float32 for w in weights.values())
    assert any(not torch.equal(w, w.to(half).float()) for w in weights.values())
    if precision == "fp16":  # steps were skipped (infinite gradient norm) from the start: the scale went down
        norms = [r["grad_norm"] for r in read_log(out) if "grad_norm" in r]
        assert len(norms) == 8 and not math.isfinite(norms[0]), norms
        assert saved["loss_scale"]["cur_scale"] < 2 ** 20, saved

    resumed = tmp_path / "resumed"
    launch("pt", *args, "--output_dir", resumed, "--resume_from_checkpoint", checkpoint, nproc=2, **env)
    _assert_resumed_like_whole(out, resumed)


# DeepSpeed's FP16_Optimizer: the wrapper of its FusedAdam (a config's "optimizer") in fp16/bf16 without ZeRO.
# FusedAdam itself is a C++ op built on first use (~100 s here); the wrapper keeps the same layout around
# torch's AdamW, which is what this script checks: checkpoint helpers in, a fresh optimizer out.
FUSED_MASTERS = """
import os
import sys

import torch

os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
import deepspeed
from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer

from stages.core.distributed import (gather_optimizer_state, gather_weights, optimizer_step, restore_optimizer_state,
                                     restore_weights)

deepspeed.init_distributed()


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)).to(torch.bfloat16)
    groups = [{"params": [p for n, p in model.named_parameters() if n.endswith(kind)], "weight_decay": decay}
              for kind, decay in (("weight", 0.1), ("bias", 0.0))]
    return model, FP16_Optimizer(torch.optim.AdamW(groups, lr=1e-2), low_precision_dtype=torch.bfloat16)


def step(model, optimizer, seed):
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    optimizer.backward(model(x).float().pow(2).mean())
    optimizer.step()
    optimizer.zero_grad()


model, optimizer = build()
assert len(optimizer.fp32_groups_flat) == 2
for seed in range(3):
    step(model, optimizer, seed)
weights, state = gather_weights(model, optimizer), gather_optimizer_state(model, optimizer)
assert {name: w.shape for name, w in weights.items()} == {name: p.shape for name, p in model.named_parameters()}
assert any(not torch.equal(w, w.bfloat16().float()) for w in weights.values())  # the fp32 masters
assert sorted(state) == sorted(f"{name}.{key}" for name in weights for key in ("exp_avg", "exp_avg_sq"))

other, fresh = build()
restore_weights(other, fresh, weights)
restore_optimizer_state(other, fresh, state, optimizer_step(optimizer))
for seed in range(3, 5):
    step(model, optimizer, seed)
    step(other, fresh, seed)
for mine, theirs in zip(optimizer.fp32_groups_flat, fresh.fp32_groups_flat):
    assert torch.equal(mine, theirs)
assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
print("same after the restore")
"""


def test_fused_fp16_optimizer_flat_masters_round_trip(tmp_path):
    """One flat fp32 master per parameter group, and its Adam state flat: gathered per weight (the fp32
    values, not the bf16 weights) and restored into a fresh optimizer, the next two steps are the original's."""
    (tmp_path / "script.py").write_text(FUSED_MASTERS)
    result = subprocess.run([sys.executable, str(tmp_path / "script.py"), str(free_port())], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env=stage_env(OMP_NUM_THREADS="1"))
    assert result.returncode == 0 and "same after the restore" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_pt_two_ranks_adafactor_resumes_from_each_rank_s_optimizer_state(tiny_model, demo_data, tmp_path, zero):
    """Adafactor's state is not one value per weight element (a scalar RMS per tensor it steps), so under
    ZeRO each rank saves its own optimizer state, as safetensors + JSON (no pickles): the checkpoint resumes
    to the uninterrupted run's weights on two ranks, and one rank is refused with the fix, exit status 2."""
    config = ROOT / "ds_configs" / f"{zero}.json"
    out = tmp_path / "pt"
    args = ["--model_name_or_path", tiny_model, "--dataset", "demo_pt", "--dataset_dir", demo_data,
            "--max_samples", "64", "--cutoff_len", "64", "--do_train", "--max_steps", "4", "--save_steps", "2",
            "--learning_rate", "1e-3", "--per_device_train_batch_size", "2", "--logging_steps", "1",
            "--report_to", "none", "--finetuning_type", "full", "--optim", "adafactor"]
    launch("pt", *args, "--output_dir", out, nproc=2, DS_CONFIG=str(config))
    saved = {p.name for p in (out / "checkpoint-2").iterdir()}
    assert {"optimizer_rank0.safetensors", "optimizer_rank0.json", "optimizer_rank1.safetensors",
            "optimizer_rank1.json"} <= saved and "optimizer.safetensors" not in saved, saved
    assert json.loads((out / "checkpoint-2" / "optimizer.json").read_text())["per_rank_world_size"] == 2

    resumed = tmp_path / "resumed"
    launch("pt", *args, "--output_dir", resumed, "--resume_from_checkpoint", out / "checkpoint-2", nproc=2,
           DS_CONFIG=str(config))
    _assert_resumed_like_whole(out, resumed)

    one = run_stage("pt", *args, "--deepspeed", config, "--output_dir", tmp_path / "one", "--resume_from_checkpoint",
                    out / "checkpoint-2", check=False)
    last = one.stderr.strip().splitlines()[-1]
    assert one.returncode == 2 and "resume on 2 ranks" in last and "Traceback" not in one.stderr, one.stderr[-3000:]


def test_deepspeed_config_without_launcher_runs_as_one_rank(tiny_model, demo_data, tmp_path):
    """`python -m stages.sft --deepspeed zero3.json` (no launcher) is a world of one, not an MPI traceback;
    its ZeRO-3 checkpoint resumes to the adapter of the uninterrupted run."""
    args = ["--model_name_or_path", tiny_model, "--dataset", "demo_sft", "--dataset_dir", demo_data,
            "--max_samples", "8", "--cutoff_len", "64", "--do_train", "--max_steps", "2", "--save_steps", "1",
            "--learning_rate", "1e-3", "--per_device_train_batch_size", "4",
            "--deepspeed", ROOT / "ds_configs" / "zero3.json", "--report_to", "none"]
    out = tmp_path / "sft"
    run_stage("sft", *args, "--output_dir", out)
    assert json.loads((out / "all_results.json").read_text())["train_loss"] > 0
    assert (out / "adapter_model.safetensors").is_file()

    resumed = tmp_path / "resumed"
    run_stage("sft", *args, "--output_dir", resumed, "--resume_from_checkpoint", out / "checkpoint-1")
    _assert_resumed_like_whole(out, resumed)
