"""Every stage for a few steps on a real pretrained model: SmolLM2-135M-Instruct (stages/core/pretrained.py).

Its details are what the tiny test model lacks: pad == eos == `<|im_end|>`, a ChatML chat template that
adds a default system prompt, tied input/output embeddings and grouped-query attention (9 query / 3
key-value heads of 64, so k_proj/v_proj map 576 -> 192). The tests check that each stage copes with
them: answers end with a learnt eos, the default system prompt is in the prompt, adapters, value heads,
ZeRO-3 saves and exports load back with plain `transformers`/`peft` and give the run's numbers, PPO's
rollouts tell padding from the prompt's eos tokens, and DyPRAG's LoRAs on the MLP inject as `peft` loads
them. Runs share their outputs through module fixtures: one sft run (two ranks, ZeRO-3) is the start of
ppo and export, one rm run (two ranks, ZeRO-2) its reward model; pt trains QLoRA 4-bit.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import ROOT, launch, rescored_results, run_stage
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
HIDDEN, KV_WIDTH, MLP_WIDTH, LAYERS = 576, 3 * 64, 1536, 30
LORA_RANK = 4
# Short runs: a few steps on 8 rows of at most CUTOFF tokens, batches of 2, eval batches of 1.
CUTOFF = 96
RM_CUTOFF = 256  # every demo_pref pair whole (some prompts hold a passage), so each row ends with its eos
STEPS = ["--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--logging_steps",
         "1", "--lora_rank", str(LORA_RANK), "--report_to", "none"]


@pytest.fixture(scope="module")
def tokenizer(pretrained_model: Path) -> Any:
    """SmolLM2's tokenizer as the stages load it; in this file it stands in for conftest's tiny one."""
    from stages.core.arguments import ModelArguments
    from stages.core.loader import load_tokenizer

    return load_tokenizer(ModelArguments(model_name_or_path=str(pretrained_model)))


@pytest.fixture(scope="module")
def base_model(pretrained_model: Path) -> Any:
    """The plain fp32 model, frozen; tests that wrap it take a copy."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(pretrained_model).eval().requires_grad_(False)


def _rows(tokenizer: Any, data: Path, dataset: str, processor: Callable, tmp_path: Path, **data_args: Any) -> Any:
    """`dataset` as the stages tokenize it (their `get_dataset` and `processor`), `data_args` being a run's flags.

    With `val_size` the held-out split the run evaluated on, else the rows of `dataset`.
    """
    from transformers import Seq2SeqTrainingArguments

    from stages.core.data import get_dataset
    from stages.core.data.processors import packed_supervised, pt_blocks, supervised
    from stages.core.data.template import get_template
    from stages.core.arguments import DataArguments

    args = DataArguments(dataset=dataset, dataset_dir=str(data), **data_args)
    kwargs: dict[str, Any] = {"tokenizer": tokenizer, "cutoff_len": args.cutoff_len}
    if processor is not pt_blocks:
        kwargs["template"] = get_template(tokenizer, args.template)
    if processor in (supervised, packed_supervised):
        kwargs["train_on_prompt"] = False
    module = get_dataset(args, Seq2SeqTrainingArguments(output_dir=str(tmp_path), do_train=True),
                         partial(processor, **kwargs), ranking=dataset == "demo_pref")
    return module.eval_dataset if args.val_size else module.train_dataset


def _mean_row_loss(model: Any, rows: Any, skip_token: int | None = None) -> float:
    """The mean over rows of each row's token-mean loss (`skip_token`: those labels left out)."""
    losses = []
    with torch.no_grad():
        for row in rows:
            labels = torch.tensor([row["labels"]])
            if skip_token is not None:
                labels[labels == skip_token] = -100
            losses.append(model(input_ids=torch.tensor([row["input_ids"]]), labels=labels).loss)
    return torch.stack(losses).mean().item()


def _adapter_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as file:
        return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}


def _assert_gqa_lora(shapes: dict[str, tuple[int, ...]], rank: int) -> None:
    """LoRA on every linear layer of all 30 layers, B of k_proj/v_proj as wide as the 3 kv heads; no embedding."""
    expected = {"q_proj": HIDDEN, "k_proj": KV_WIDTH, "v_proj": KV_WIDTH, "o_proj": HIDDEN, "gate_proj": MLP_WIDTH,
                "up_proj": MLP_WIDTH, "down_proj": HIDDEN}
    for module, width in expected.items():
        b = {k: v for k, v in shapes.items() if f".{module}.lora_B." in k}
        a = {k: v for k, v in shapes.items() if f".{module}.lora_A." in k}
        assert len(b) == len(a) == LAYERS, module
        assert set(b.values()) == {(width, rank)}, (module, set(b.values()))
        assert set(a.values()) == {(rank, MLP_WIDTH if module == "down_proj" else HIDDEN)}, module
    assert not [k for k in shapes if "embed_tokens" in k or "lm_head" in k]  # tied: never trained or saved


# ------------------------------------------------------------------------------------ data


def test_chatml_rows_learn_answer_and_eos_with_default_system(tokenizer, demo_data, tmp_path):
    """sft rows (auto template = the model's ChatML): a row without a system gets the template's default system
    prompt, one with a system gets its own; each assistant turn's labels are exactly its answer + <|im_end|>
    (the newline ChatML writes after it opens the next turn and is never learnt); packed rows keep every
    sample's eos labelled; the collator pads input with the eos but never masks the answer's eos; pt blocks
    are the texts each closed by a labelled eos."""
    from stages.core.data.collator import SupervisedCollator
    from stages.core.data.processors import packed_supervised, pt_blocks, supervised

    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos and tokenizer.convert_ids_to_tokens(eos) == "<|im_end|>"
    raw = {name: json.loads((demo_data / f"{name}.json").read_text())[:4] for name in ("demo_sft", "demo_sft_chat")}
    for name, rows in (("demo_sft", _rows(tokenizer, demo_data, "demo_sft", supervised, tmp_path, max_samples=4)),
                       ("demo_sft_chat", _rows(tokenizer, demo_data, "demo_sft_chat", supervised, tmp_path,
                                               max_samples=4))):
        assert len(rows) == 4
        for row, sample in zip(rows, raw[name]):
            ids, labels = row["input_ids"], row["labels"]
            text = tokenizer.decode(ids)
            system = sample.get("system") or DEFAULT_SYSTEM
            assert text.startswith(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"), text[:120]
            assert (DEFAULT_SYSTEM in text) == (name == "demo_sft")
            answers = ([sample["output"]] if name == "demo_sft" else
                       [turn["value"] for turn in sample["conversations"] if turn["from"] == "gpt"])
            spans, span = [], []
            for token, label in zip(ids, labels):
                if label != -100:
                    assert label == token
                    span.append(token)
                elif span:
                    spans.append(span)
                    span = []
            spans += [span] if span else []
            expected = [tokenizer.encode(answer, add_special_tokens=False) + [eos] for answer in answers]
            assert spans == expected
            assert labels[-1] == ids[-1] == eos and text.endswith("<|im_end|>")

    # Packing: each sample of a row is a segment, and its answer still ends with its labelled eos.
    packed = _rows(tokenizer, demo_data, "demo_sft_chat", packed_supervised, tmp_path, max_samples=8,
                   cutoff_len=256)
    assert len(packed) < 8
    for row in packed:
        ends = [i for i, (a, b) in enumerate(zip(row["segment_ids"], row["segment_ids"][1:] + [0])) if a != b]
        assert all(row["labels"][end] == row["input_ids"][end] == eos for end in ends)

    # The collator pads with the eos (the pad id) yet labels the padding -100 only: the answer's eos stays a label.
    rows = list(_rows(tokenizer, demo_data, "demo_sft", supervised, tmp_path, max_samples=2))
    batch = SupervisedCollator(tokenizer.pad_token_id, pad_to_multiple_of=1)(rows)
    lengths = [len(row["input_ids"]) for row in rows]
    assert lengths[0] != lengths[1]
    for i, length in enumerate(lengths):
        assert batch["labels"][i, length - 1] == eos and batch["attention_mask"][i, :length].all()
        assert (batch["labels"][i, length:] == -100).all() and (batch["input_ids"][i, length:] == eos).all()

    # pt: every text closed by the eos, in the labels as in the inputs.
    blocks = _rows(tokenizer, demo_data, "demo_pt", pt_blocks, tmp_path, max_samples=8, cutoff_len=64)
    texts = [json.loads(line)["text"] for line in (demo_data / "demo_pt.jsonl").read_text().splitlines()[:8]]
    stream = [t for text in texts for t in tokenizer.encode(text, add_special_tokens=False) + [eos]]
    joined = [t for block in blocks for t in block["input_ids"]]
    assert joined == stream[:len(joined)] and all(block["labels"] == block["input_ids"] for block in blocks)
    assert joined.count(eos) >= 3


# ------------------------------------------------------------------------------------- sft


SFT_EVAL = {"max_samples": 8, "cutoff_len": CUTOFF}


@pytest.fixture(scope="module")
def sft_zero3(pretrained_model: Path, demo_data: Path, tmp_path_factory) -> Path:
    """Two ranks under ZeRO-3: LoRA on every linear layer, evaluated on its 8 rows (one per rank and step)."""
    out = tmp_path_factory.mktemp("real_sft") / "sft"
    launch("sft", "--model_name_or_path", pretrained_model, "--dataset", "demo_sft", "--dataset_dir", demo_data,
           "--max_samples", SFT_EVAL["max_samples"], "--cutoff_len", SFT_EVAL["cutoff_len"], "--output_dir", out,
           "--do_train", *STEPS, "--eval_dataset", "demo_sft", "--do_eval", "--per_device_eval_batch_size", "1",
           "--average_tokens_across_devices", "false", DS_CONFIG=str(ROOT / "ds_configs" / "zero3.json"))
    return out


def test_sft_zero3_two_ranks_adapter_reloads_with_its_eval_loss(sft_zero3, pretrained_model, demo_data, tokenizer,
                                                                base_model, tmp_path):
    """The ZeRO-3 run's LoRA covers the kv projections at their GQA width (192) and no embedding (tied); loaded
    with plain peft it gives the evaluation loss the run measured on its partitioned engine, a loss that
    counts each answer's eos (without the eos labels it would be another number)."""
    from peft import PeftModel

    from stages.core.data.processors import supervised

    losses = [r["loss"] for r in map(json.loads, (sft_zero3 / "trainer_log.jsonl").read_text().splitlines())
              if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    _assert_gqa_lora(_adapter_shapes(sft_zero3), LORA_RANK)
    assert json.loads((sft_zero3 / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        pretrained_model)

    rows = _rows(tokenizer, demo_data, "demo_sft", supervised, tmp_path, **SFT_EVAL)
    assert len(rows) == 8
    model = PeftModel.from_pretrained(copy.deepcopy(base_model), sft_zero3).eval()
    eval_loss = json.loads((sft_zero3 / "eval_results.json").read_text())["eval_loss"]
    assert _mean_row_loss(model, rows) == pytest.approx(eval_loss, rel=1e-4)
    assert abs(_mean_row_loss(model, rows, skip_token=tokenizer.eos_token_id) - eval_loss) > 1e-3


def test_sft_packing_and_predict_with_generate(pretrained_model, demo_data, tmp_path):
    """One process: packed multi-turn rows train; generation from ChatML prompts (left-padded with the eos)
    writes predictions whose prompts hold the default system prompt and whose labels are the reference answers
    (the eos that closes them is not part of the text), with ROUGE/BLEU metrics."""
    out = tmp_path / "sft_packed"
    run_stage("sft", "--model_name_or_path", pretrained_model, "--dataset", "demo_sft_chat", "--dataset_dir",
              demo_data, "--max_samples", "4", "--cutoff_len", "128", "--packing", "true", "--output_dir", out,
              "--do_train", *STEPS, "--eval_dataset", "demo_sft", "--do_predict",
              "--predict_with_generate", "--max_new_tokens", "6", "--per_device_eval_batch_size", "2")
    losses = [r["loss"] for r in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    predictions = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    references = json.loads((demo_data / "demo_sft.json").read_text())[:4]
    assert [p["label"] for p in predictions] == [r["output"] for r in references]
    assert all(p["prompt"].startswith(f"system\n{DEFAULT_SYSTEM}\nuser\n") for p in predictions)
    assert all(isinstance(p["predict"], str) and "<|im_end|>" not in p["predict"] for p in predictions)
    metrics = json.loads((out / "predict_results.json").read_text())
    assert {"predict_rouge-1", "predict_bleu-4"} <= metrics.keys()


def test_export_merges_into_tied_embeddings(sft_zero3, pretrained_model, base_model, tokenizer, tmp_path):
    """export: the merged folder loads with plain transformers with its output embedding still the input one
    (one tensor on disk), gives base + adapter's logits, and keeps the tokenizer (pad == eos)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = tmp_path / "merged"
    run_stage("export", "--model_name_or_path", pretrained_model, "--adapter_name_or_path", sft_zero3,
              "--export_dir", merged_dir)
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["num_key_value_heads"] == 3
    with safe_open(str(merged_dir / "model.safetensors"), "pt") as file:
        assert "lm_head.weight" not in file.keys() and "model.embed_tokens.weight" in file.keys()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    assert torch.equal(merged.model.embed_tokens.weight, base_model.model.embed_tokens.weight)
    saved = AutoTokenizer.from_pretrained(merged_dir)
    assert saved.pad_token == saved.eos_token == "<|im_end|>" and saved.chat_template == tokenizer.chat_template

    batch = tokenizer(["What did the cartographer invent?", "Hi"], return_tensors="pt", padding=True)
    adapted = PeftModel.from_pretrained(copy.deepcopy(base_model), sft_zero3).eval()
    with torch.no_grad():
        expected = adapted(**batch).logits
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=0, atol=1e-4)
        assert (expected - base_model(**batch).logits).abs().max() > 1e-3  # the adapter does something


# -------------------------------------------------------------------------------------- pt


def test_pt_qlora_4bit_adapter_reloads_with_its_eval_loss(pretrained_model, demo_data, tokenizer, tmp_path):
    """pt with QLoRA (nf4, double quantization): the adapter, loaded with plain peft onto a freshly quantized
    base, gives the evaluation loss of the run on its held-out blocks (whose labels include the eos ids)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from stages.core.data.processors import pt_blocks
    from stages.core.loader import build_quantization_config

    out = tmp_path / "pt"
    run_stage("pt", "--model_name_or_path", pretrained_model, "--dataset", "demo_pt", "--dataset_dir", demo_data,
              "--max_samples", "16", "--cutoff_len", "64", "--val_size", "4", "--output_dir", out, "--do_train",
              "--do_eval", "--per_device_eval_batch_size", "1", "--quantization_bit", "4", "--quantization_type",
              "nf4", "--double_quantization", "true", *STEPS)
    _assert_gqa_lora(_adapter_shapes(out), LORA_RANK)
    rows = _rows(tokenizer, demo_data, "demo_pt", pt_blocks, tmp_path, max_samples=16, cutoff_len=64, val_size=4)
    assert len(rows) >= 1 and any(tokenizer.eos_token_id in row["labels"] for row in rows)
    quantized = AutoModelForCausalLM.from_pretrained(
        pretrained_model, quantization_config=build_quantization_config(4, "nf4", True, torch.float32),
        device_map={"": "cpu"})
    model = PeftModel.from_pretrained(quantized, out).eval()
    eval_loss = json.loads((out / "eval_results.json").read_text())["eval_loss"]
    assert _mean_row_loss(model, rows) == pytest.approx(eval_loss, rel=1e-4)


# ---------------------------------------------------------------------------------- rm, ppo


@pytest.fixture(scope="module")
def rm_zero2(pretrained_model: Path, demo_data: Path, tmp_path_factory) -> Path:
    """Two ranks under ZeRO-2: a LoRA reward model with a fresh value head; scores of its 8 pairs predicted."""
    out = tmp_path_factory.mktemp("real_rm") / "rm"
    launch("rm", "--model_name_or_path", pretrained_model, "--dataset", "demo_pref", "--eval_dataset", "demo_pref",
           "--dataset_dir", demo_data, "--max_samples", "8", "--cutoff_len", RM_CUTOFF, "--output_dir", out,
           "--do_train", "--do_predict", "--per_device_eval_batch_size", "2", *STEPS,
           DS_CONFIG=str(ROOT / "ds_configs" / "zero2.json"))
    return out


def test_rm_zero2_two_ranks_value_head_reloads_with_its_scores(rm_zero2, pretrained_model, demo_data, tokenizer,
                                                               tmp_path):
    """The value head (one score on the 576-wide backbone) is saved with the adapter; plain transformers
    (its PEFT integration) and the project's loader reload it and score the pairs as the two-rank run did.
    Rows end with the answer's eos, and the rm scores them at the last token before it (pad == eos)."""
    from transformers import AutoModelForSequenceClassification

    from stages.core.data.processors import pairwise
    from stages.core.arguments import FinetuningArguments, ModelArguments
    from stages.core.loader import load_model

    shapes = _adapter_shapes(rm_zero2)
    assert [shape for key, shape in shapes.items() if key.endswith("score.weight")] == [(1, HIDDEN)]
    _assert_gqa_lora({k: v for k, v in shapes.items() if "lora_" in k}, LORA_RANK)
    predicted = [json.loads(line) for line in (rm_zero2 / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(predicted) == 8

    rows = _rows(tokenizer, demo_data, "demo_pref", pairwise, tmp_path, max_samples=8, cutoff_len=RM_CUTOFF)
    plain = AutoModelForSequenceClassification.from_pretrained(rm_zero2, num_labels=1).eval()
    ours = load_model(tokenizer, ModelArguments(model_name_or_path=str(pretrained_model),
                                                adapter_name_or_path=str(rm_zero2)),
                      FinetuningArguments(), is_trainable=False, add_valuehead=True)
    with torch.no_grad():
        for row, scores in zip(rows, predicted):
            for side in ("chosen", "rejected"):
                ids = torch.tensor([row[f"{side}_input_ids"]])
                assert ids[0, -1] == tokenizer.eos_token_id
                score = plain(input_ids=ids).logits[0, 0].item()
                assert score == pytest.approx(scores[side], abs=1e-4)
                assert ours(input_ids=ids).logits[0, 0].item() == pytest.approx(score, abs=1e-5)
                hidden = plain.model(input_ids=ids).last_hidden_state[0, -2]
                assert plain.score(hidden).item() == pytest.approx(score, abs=1e-5)


def test_ppo_rollouts_keep_prompt_eos_and_score_where_the_rm_pools(rm_zero2, demo_data, tokenizer, tmp_path):
    """With pad == eos, PPO's rollouts pad with another special token that no prompt holds: TRL's masks then keep
    every <|im_end|> of the ChatML prompts, the eos that ends an answer stays inside the learnt response, and
    the reward of a rollout is the rm's score of the same text (scored where the rm pools)."""
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding
    from trl.experimental.ppo.ppo_trainer import truncate_response
    from trl.experimental.utils import first_true_indices, get_reward

    from stages.core.data.processors import prompt_only
    from stages.core.ppo_trainer import rollout_pad_token, score_positions

    eos = tokenizer.eos_token_id
    prompts = _rows(tokenizer, demo_data, "demo_sft_chat", prompt_only, tmp_path, max_samples=2, cutoff_len=256)
    pad = rollout_pad_token(tokenizer, [prompts])
    rollout = copy.deepcopy(tokenizer)
    rollout.pad_token, rollout.padding_side = pad, "left"
    assert rollout.pad_token_id != eos and all(rollout.pad_token_id not in row for row in prompts["input_ids"])
    assert all(row.count(eos) >= 4 for row in prompts["input_ids"])  # system, user, assistant, user turns
    batch = DataCollatorWithPadding(rollout)([{"input_ids": row} for row in prompts["input_ids"]])
    queries = batch["input_ids"]
    assert torch.equal(queries != rollout.pad_token_id, batch["attention_mask"].bool())  # TRL's mask, exactly

    # Answers of different lengths, each closed by eos and followed by more sampled tokens.
    answers = [tokenizer.encode(text, add_special_tokens=False) for text in ("Glimne River.", "It is famous.")]
    width = max(map(len, answers)) + 3
    responses = torch.tensor([answer + [eos] + [13] * (width - len(answer) - 1) for answer in answers])
    responses = truncate_response(eos, rollout.pad_token_id, responses)
    lengths = first_true_indices(responses == rollout.pad_token_id) - 1
    assert lengths.tolist() == [len(answer) for answer in answers]  # the eos is the last learnt token

    rm = AutoModelForSequenceClassification.from_pretrained(rm_zero2, num_labels=1).eval()
    context = queries.shape[1]
    query_responses = torch.cat((queries, responses), 1)
    with torch.no_grad():
        logits, _, ends = get_reward(rm, query_responses, rollout.pad_token_id, context)
        positions = score_positions(query_responses, ends, eos)
        rewards = logits[torch.arange(len(answers)), positions].squeeze(-1)
        for prompt, answer, reward in zip(prompts["input_ids"], answers, rewards):
            alone = rm(input_ids=torch.tensor([prompt + answer + [eos]])).logits[0, 0]
            assert reward.item() == pytest.approx(alone.item(), abs=1e-4)


def test_ppo_lora_from_sft_and_rm(sft_zero3, rm_zero2, pretrained_model, demo_data, tmp_path):
    """One PPO update on ChatML prompts: the reference (the policy's adapter disabled) is the sft policy, so the
    first KL is ~0; the policy is saved as an LoRA adapter with the tokenizer as given (pad == eos)."""
    from transformers import AutoTokenizer

    out = tmp_path / "ppo"
    run_stage("ppo", "--model_name_or_path", pretrained_model, "--adapter_name_or_path", sft_zero3,
              "--reward_model", rm_zero2, "--dataset", "demo_sft_chat", "--dataset_dir", demo_data, "--max_samples",
              "4", "--cutoff_len", "128", "--output_dir", out, "--max_steps", "1", "--per_device_train_batch_size",
              "2", "--per_device_eval_batch_size", "1", "--max_new_tokens", "6", "--ppo_epochs", "1",
              "--learning_rate", "1e-4", "--lora_rank", str(LORA_RANK), "--logging_steps", "1", "--sample_steps", "1",
              "--report_to", "none")
    records = [r for r in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines())
               if "objective/scores" in r]
    assert len(records) == 1 and math.isfinite(records[0]["objective/scores"])
    assert abs(records[0]["objective/kl"]) < 1e-3
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 1 and math.isfinite(samples[0]["reward"])
    assert samples[0]["prompt"].startswith("system\nYou are a knowledgeable guide.")
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter)
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.pad_token == saved.eos_token == "<|im_end|>"


# ---------------------------------------------------------------------------------- DyPRAG


@pytest.fixture(scope="module")
def dyprag_run(pretrained_model: Path, demo_data: Path, tmp_path_factory) -> dict[str, Path]:
    """retrieve -> augment -> encode -> projector on 2 questions, 2 retrieved passages each."""
    work = tmp_path_factory.mktemp("real_dyprag")
    questions = work / "questions.json"
    questions.write_text(json.dumps(json.loads((demo_data / "demo_qa.json").read_text())[:2]))
    run_stage("retrieve", "--corpus", demo_data / "demo_corpus.jsonl", "--index_dir", work / "index",
              "--input_file", questions, "--output_file", work / "retrieved.json", "--top_k", "2")
    run_stage("augment", "--model_name_or_path", pretrained_model, "--input_file", work / "retrieved.json",
              "--output_dir", work / "augment", "--top_k", "2", "--max_attempts", "1", "--max_new_tokens", "16",
              "--do_sample", "false", "--keep_skipped", "--per_device_eval_batch_size", "4", "--report_to", "none")
    records = work / "augment" / "augmented.json"
    run_stage("encode", "--model_name_or_path", pretrained_model, "--input_file", records, "--output_dir",
              work / "bank", "--cutoff_len", "128", "--learning_rate", "1e-3", "--report_to", "none")
    run_stage("projector", "--model_name_or_path", pretrained_model, "--data_file", records, "--bank_dir",
              work / "bank", "--output_dir", work / "projector", "--max_steps", "2", "--per_device_train_batch_size",
              "1", "--learning_rate", "1e-3", "--cutoff_len", "256", "--max_passage_length", "128",
              "--report_to", "none")
    return {"work": work, "records": records, "bank": work / "bank", "projector": work / "projector"}


def test_retrieve_and_augment_with_the_real_model(dyprag_run):
    """BM25 gives each question 2 passages; augment asks the real chat model about each distinct one and keeps
    every passage (--keep_skipped) with its augmentation where the reply parsed; the counts add up."""
    retrieved = json.loads((dyprag_run["work"] / "retrieved.json").read_text())
    assert [len(r["passages"]) for r in retrieved] == [2, 2]
    summary = json.loads((dyprag_run["work"] / "augment" / "augment_summary.json").read_text())
    assert summary["passages_in_records"] == 4 and summary["passages"] <= 4  # distinct texts augmented once
    assert summary["passages"] == summary["augmented"] + summary["skipped_qa"] + summary["skipped_rewrite"]
    assert summary["augment_model_name"] == "smollm2-135m-instruct"
    records = json.loads(dyprag_run["records"].read_text())
    assert [r["passages"] for r in records] == [r["passages"] for r in retrieved]
    assert sum(len(r["augment"]) for r in records) == summary["augmented"]


def test_encode_bank_loras_on_the_mlp_inject_as_peft_loads_them(dyprag_run, base_model, tmp_path):
    """Every passage has a rank-2 LoRA on gate/up/down of the 30 layers (576 <-> 1536); one exported as a peft
    adapter gives, with plain peft, the logits of injecting it from the bank."""
    from peft import PeftModel

    from dyprag.bank import LoraBank
    from dyprag.lora import inject_lora

    bank = LoraBank(dyprag_run["bank"])
    assert sorted(bank.passage_ids) == ["0_0", "0_1", "1_0", "1_1"]
    lora = bank.load(["1_1"])
    assert len(lora) == 3 * LAYERS
    for name, (a, b) in lora.items():
        inner, outer = (MLP_WIDTH, HIDDEN) if name.endswith("down_proj") else (HIDDEN, MLP_WIDTH)
        assert a.shape == (1, 2, inner) and b.shape == (1, outer, 2), name
        assert b.abs().max() > 0, name  # trained away from B = 0
    bank.export_peft("1_1", tmp_path / "exported")
    ids = torch.randint(100, 40000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path / "exported").eval()(
            input_ids=ids).logits
        with inject_lora(base_model, lora, bank.spec.scaling):
            injected = base_model(input_ids=ids).logits
        assert (expected - base_model(input_ids=ids).logits).abs().max() > 0
    torch.testing.assert_close(injected, expected, atol=1e-4, rtol=1e-4)


def test_projector_export_adapter_injects_as_peft_loads_it(dyprag_run, pretrained_model, base_model, tokenizer,
                                                          tmp_path):
    """The projector trained (finite loss terms); its generated LoRA for two passages, written by projector_export
    as a peft folder (rank 2 x 2 passages), gives with plain peft the logits of injecting the same generated LoRA."""
    from peft import PeftModel

    from dyprag.lora import inject_lora, select
    from dyprag.projector_model import ProjectorLoras, combine_loras, load_projector

    log = [json.loads(line) for line in (dyprag_run["projector"] / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)
    passages = json.loads(dyprag_run["records"].read_text())[0]["passages"]
    (tmp_path / "passages.json").write_text(json.dumps(passages))
    run_stage("projector_export", "--projector_dir", dyprag_run["projector"], "--passages_file",
              tmp_path / "passages.json", "--combination", "deltas", "--output_dir", tmp_path / "generated")
    assert json.loads((tmp_path / "generated" / "adapter_config.json").read_text())["r"] == 4
    projector = load_projector(dyprag_run["projector"])
    assert projector.config.base_model_name_or_path == str(pretrained_model)
    generated = ProjectorLoras(projector, base_model, tokenizer).generate(passages)
    lora = combine_loras([select(generated, i) for i in range(len(passages))], "deltas")
    ids = torch.randint(100, 40000, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = PeftModel.from_pretrained(copy.deepcopy(base_model), tmp_path / "generated").eval()(
            input_ids=ids).logits
        with inject_lora(base_model, lora, projector.config.spec.scaling):
            injected = base_model(input_ids=ids).logits
        assert (expected - base_model(input_ids=ids).logits).abs().max() > 0
    torch.testing.assert_close(injected, expected, atol=1e-4, rtol=1e-4)


def test_prag_eval_every_method(dyprag_run, pretrained_model, tmp_path):
    """prag_eval answers the 2 questions with all six methods (the passages' LoRAs, the generated ones) and
    writes per method the mean EM and F1 of its answers as scored one by one in predictions.jsonl."""
    out = tmp_path / "eval"
    run_stage("prag_eval", "--model_name_or_path", pretrained_model, "--data_file", dyprag_run["records"],
              "--bank_dir", dyprag_run["bank"], "--projector_dir", dyprag_run["projector"], "--top_k", "2",
              "--max_new_tokens", "6", "--output_dir", out, "--report_to", "none")
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [r["method"] for r in rows] == ["vanilla", "rag", "prag", "prag_combine", "dyprag", "dyprag_combine"]
    rescored = rescored_results(out)
    assert all(r["questions"] == 2 and (2, r["em"], r["f1"]) == pytest.approx(rescored[r["method"]]) for r in rows)
