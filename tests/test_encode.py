"""PRAG encoding: batched per-passage LoRA training == one-at-a-time peft training; the LoRA bank; the stage."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import SHARED_DATA, launch, run_stage

from dyprag.bank import LoraBank, LoraBankError, LoraBankWriter, merge_parts
from dyprag.passage_training import (EncodeConfig, StepReport, encode_batch, init_lora, linear_cross_entropy, loss_head,
                                     passage_texts, training_tokens)
from dyprag.lora import LoraSpec, inject_lora, save_peft_adapter

SPEC = LoraSpec()
REAL_RECORDS = SHARED_DATA / "prag_augmented" / "complexwebquestions_llama3.2-1b_46.json"


@pytest.fixture(scope="module")
def demo_passages(demo_data, tokenizer):
    """Three demo passages with 1, 2 and 3 QA pairs (2, 3 and 5 training texts), rewrites made up."""
    records = json.loads((demo_data / "demo_qa.json").read_text())
    texts = []
    for count, record in zip((1, 2, 3), records[:3]):
        passage = record["passages"][0]
        rewrite = " ".join(reversed(passage.split(". ")))
        qas = [{"question": r["question"], "answer": r["answer"][0]} for r in records[:count]]
        texts.append(passage_texts(tokenizer, passage, rewrite, qas))
    return texts


def test_training_texts_follow_the_prag_recipe(tokenizer, demo_passages):
    assert [len(t) for t in demo_passages] == [2, 3, 5]  # ceil(n/2) QAs x (passage, rewrite) + the rest alone
    first, second, third, fourth, fifth = (tokenizer.decode(t) for t in demo_passages[2])
    passage = first.split("Passage 1: ")[1].split("\n")[0]
    assert passage in first and passage not in second and "Passage 1:" in second  # passage, then its rewrite
    assert "Passage 1:" not in fifth and fifth.rstrip().endswith(".")  # the last QA without context
    assert "The answer is" in first
    assert passage_texts(tokenizer, "Only a passage.") == [tokenizer.encode("Only a passage.")]


def peft_sequential(model, init_dir: Path, texts, config: EncodeConfig, pad_id: int):
    """The original PRAG loop, one passage at a time: peft adapter from the shared init, torch AdamW."""
    from peft import PeftModel

    results = []
    for passage in texts:
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(init_dir), is_trainable=True)
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad],
                                      lr=config.learning_rate)
        for _ in range(config.num_epochs):
            for start in range(0, len(passage), config.texts_per_step):
                rows = passage[start:start + config.texts_per_step]
                width = max(map(len, rows))
                ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
                mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
                labels = ids.masked_fill(mask == 0, -100)
                optimizer.zero_grad()
                peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
                optimizer.step()
        results.append({k: v.detach() for k, v in peft_model.state_dict().items() if "lora_" in k})
    return results


@pytest.mark.parametrize("texts_per_step", [1, 2])
def test_batched_encoding_equals_sequential_peft(model, tokenizer, demo_passages, tmp_path, texts_per_step):
    config = EncodeConfig(num_epochs=2, texts_per_step=texts_per_step, max_batch_tokens=600)  # several forwards
    init = init_lora(model, SPEC, seed=42)
    save_peft_adapter(init, 0, SPEC, "tiny", tmp_path / "init")
    batched = encode_batch(model, SPEC, init, demo_passages, config, tokenizer.pad_token_id)
    expected = peft_sequential(model, tmp_path / "init", demo_passages, config, tokenizer.pad_token_id)

    for p, reference in enumerate(expected):
        for name, (lora_a, lora_b) in batched.weights.items():
            ref_a = reference[f"base_model.model.{name}.lora_A.default.weight"]
            ref_b = reference[f"base_model.model.{name}.lora_B.default.weight"]
            torch.testing.assert_close(lora_a[p], ref_a, atol=1e-5, rtol=0)
            torch.testing.assert_close(lora_b[p], ref_b, atol=1e-5, rtol=0)
    # The LoRAs trained (B left zero, A moved) and differ per passage; the loss fell over the epochs.
    name = next(iter(batched.weights))
    lora_a, lora_b = batched.weights[name]
    assert lora_b.abs().min(dim=-1).values.max() > 1e-4 and not torch.equal(lora_a[0], init[name][0][0])
    assert not torch.allclose(lora_b[0], lora_b[1])
    assert (batched.epoch_loss[:, 1] < batched.epoch_loss[:, 0]).all()


def test_linear_cross_entropy_matches_the_full_logits_loss_and_gradient():
    """Chunked per-token cross-entropy (chunks of 3 of 10 tokens) = F.cross_entropy of the full logits, in value
    and in the gradient to the hidden states, under any weighting of the tokens; the head stays frozen."""
    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False).requires_grad_(False)
    head.weight.copy_(torch.randn(50, 8, generator=generator))
    hidden = torch.randn(10, 8, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (10,), generator=generator)
    weights = torch.rand(10, generator=generator)

    expected = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="none")
    (expected * weights).sum().backward()
    expected_grad, hidden.grad = hidden.grad.clone(), None
    import dyprag.passage_training as passage_training

    chunk = passage_training.LOGITS_PER_CHUNK
    passage_training.LOGITS_PER_CHUNK = 3 * 50
    try:
        got = linear_cross_entropy(hidden, head, targets, 50)
    finally:
        passage_training.LOGITS_PER_CHUNK = chunk
    (got * weights).sum().backward()
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden.grad, expected_grad, atol=1e-5, rtol=1e-5)
    assert head.weight.grad is None


def test_loss_head_only_where_the_logits_are_the_heads(model):
    """The decoder + head path is taken where it reproduces the model's logits; a model whose logits are
    post-processed (here scaled after the head) keeps its own logits for the loss."""
    assert loss_head(model) is not None
    scaled = copy.deepcopy(model)
    forward = scaled.forward

    def soft_capped(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = 30 * torch.tanh(out.logits / 30)
        return out

    scaled.forward = soft_capped
    assert loss_head(scaled) is None


def test_every_optimizer_step_reports_progress(model, tokenizer, demo_passages):
    """on_step runs once per step of the longest passage, numbering the steps, counting the passages done
    (those whose steps are all run) and the tokens trained, which sum to `training_tokens`."""
    config = EncodeConfig(num_epochs=2, texts_per_step=2)
    reports: list[StepReport] = []
    encode_batch(model, SPEC, init_lora(model, SPEC, seed=42), demo_passages, config, tokenizer.pad_token_id,
                 reports.append)
    steps = [2 * math.ceil(len(t) / 2) for t in demo_passages]  # 2, 4, 6 steps for 2, 3, 5 texts
    assert [r.step for r in reports] == list(range(1, 7)) and {r.steps for r in reports} == {6}
    assert [r.finished for r in reports] == [sum(s <= step for s in steps) for step in range(1, 7)]
    assert sum(r.tokens for r in reports) == training_tokens(demo_passages, config)
    assert reports[0].tokens > reports[-1].tokens > 0  # three passages train in step 1, one in step 6


# ------------------------------------------------------------------------------------------- bank

def _random(count: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.mlp.{m}": (torch.randn(count, 2, 8, generator=generator),
                                         torch.randn(count, 6 if m != "down_proj" else 8, 2, generator=generator))
            for i in range(2) for m in ("gate_proj", "up_proj", "down_proj")}


def test_bank_round_trip_across_shards_and_parts(tmp_path):
    weights = _random(7, seed=0)
    ids = [f"{i // 3}_{i % 3}" for i in range(7)]
    with LoraBankWriter(tmp_path, SPEC, "base", shard_size=2, part="rank00000") as writer:
        for row in range(4):
            writer.add(ids[row], weights, row)
    with LoraBankWriter(tmp_path, SPEC, "base", shard_size=2, part="rank00001") as writer:
        for row in range(4, 7):
            writer.add(ids[row], weights, row)
        with pytest.raises(ValueError, match="already"):
            writer.add(ids[5], weights, 5)
    with pytest.raises(LoraBankError, match="did not finish"):
        LoraBank(tmp_path)
    merge_parts(tmp_path)
    bank = LoraBank(tmp_path)
    assert sorted(bank.passage_ids) == sorted(ids) and bank.spec == SPEC and len(list(tmp_path.glob("*shard*"))) == 4
    order = [6, 0, 3, 5, 1]  # rows from every shard of both parts, out of order
    loaded = bank.load([ids[i] for i in order], dtype=torch.float64)
    for name, (lora_a, lora_b) in weights.items():
        assert loaded[name][0].dtype == torch.float64
        torch.testing.assert_close(loaded[name][0], lora_a[order].double())
        torch.testing.assert_close(loaded[name][1], lora_b[order].double())
    with pytest.raises(KeyError, match="9_9"):
        bank.load(["9_9"])


def test_bank_reports_a_corrupt_or_truncated_shard_by_name(tmp_path):
    with LoraBankWriter(tmp_path, SPEC, "base", shard_size=2) as writer:
        for row in range(4):
            writer.add(f"p{row}", _random(4, seed=1), row)
    shard = tmp_path / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # one flipped bit in the last tensor
    shard.write_bytes(bytes(data))
    bank = LoraBank(tmp_path)
    assert bank.load(["p0"])  # the intact shard still loads
    with pytest.raises(LoraBankError, match="shard-00001.safetensors is corrupt"):
        bank.load(["p3"])
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(LoraBankError, match="shard-00001.safetensors is truncated"):
        LoraBank(tmp_path).load(["p2"])


# ------------------------------------------------------------------------------------------ stage

def _bank_matches_peft_and_injection(model, bank_dir: Path, passage_id: str, tmp_path: Path) -> None:
    """export_peft -> plain peft gives the logits of injecting the bank's LoRA."""
    from peft import PeftModel

    bank = LoraBank(bank_dir)
    bank.export_peft(passage_id, tmp_path / "exported")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "exported").eval()
    ids = torch.randint(4, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        with inject_lora(model, bank.load([passage_id]), bank.spec.scaling):
            injected = model(input_ids=ids).logits
        base = model(input_ids=ids).logits
    assert (expected - base).abs().max() > 0  # the trained LoRA does something
    torch.testing.assert_close(injected, expected, atol=1e-5, rtol=1e-5)


def test_stage_encodes_real_records_resumes_and_exports(tiny_model, model, tmp_path):
    if not REAL_RECORDS.is_file():
        pytest.skip(f"real PRAG records {REAL_RECORDS} are absent")
    out = tmp_path / "bank"
    args = ["--model_name_or_path", tiny_model, "--input_file", REAL_RECORDS, "--output_dir", out,
            "--passages_per_batch", "4", "--cutoff_len", "256", "--report_to", "none"]
    run_stage("encode", *args, "--max_samples", "2")
    assert len(LoraBank(out)) == 6
    run_stage("encode", *args, "--max_samples", "4", "--resume_from_checkpoint", "last")
    summary = json.loads((out / "encode_summary.json").read_text())
    assert summary["passages"] == 12 and summary["encoded_now"] == 6 and summary["without_augmentation"] == 0
    records = json.loads(REAL_RECORDS.read_text())[:4]
    assert sorted(LoraBank(out).passage_ids) == sorted(f"{r['test_id']}_{p}" for r in records for p in range(3))
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert log and all(math.isfinite(r["loss"]) for r in log)
    _bank_matches_peft_and_injection(model, out, f"{records[3]['test_id']}_2", tmp_path)
    # The old spelling --resume still continues the bank (nothing left to encode), with a notice naming the new one.
    result = run_stage("encode", *args, "--max_samples", "4", "--resume")
    assert "--resume is renamed --resume_from_checkpoint last" in result.stderr
    summary = json.loads((out / "encode_summary.json").read_text())
    assert summary["passages"] == 12 and summary["encoded_now"] == 0


def test_stage_without_augmentation_trains_on_passages(tiny_model, demo_data, tmp_path):
    out = tmp_path / "bank"
    result = run_stage("encode", "--model_name_or_path", tiny_model, "--input_file", demo_data / "demo_qa.json",
                       "--output_dir", out, "--max_samples", "2", "--report_to", "none")
    assert "have no augmentation" in result.stderr
    bank = LoraBank(out)
    assert sorted(bank.passage_ids) == ["0_0", "0_1", "0_2", "1_0", "1_1", "1_2"]
    lora_b = bank.load(bank.passage_ids)["model.layers.0.mlp.up_proj"][1]
    assert lora_b.abs().amax(dim=(1, 2)).min() > 0  # every passage trained away from B = 0


@pytest.mark.slow
def test_two_ranks_split_the_passages_into_one_bank(tiny_model, demo_data, model, tokenizer, tmp_path):
    out = tmp_path / "bank"
    launch("encode", "--model_name_or_path", tiny_model, "--input_file", demo_data / "demo_qa.json",
           "--output_dir", out, "--max_samples", "3", "--shard_size", "2", "--report_to", "none")
    bank = LoraBank(out)
    summary = json.loads((out / "encode_summary.json").read_text())
    assert len(bank) == 9 and summary["ranks"] == 2
    assert {p.name.split("-")[0] for p in out.glob("*shard-*")} == {"rank00000", "rank00001"}
    assert not list(out.glob("index.rank*.json"))  # the parts were joined into index.json
    # Each rank's LoRAs are the ones a single process trains for those passages.
    records = json.loads((demo_data / "demo_qa.json").read_text())[:3]
    texts = [passage_texts(tokenizer, passage) for record in records for passage in record["passages"]]
    init = init_lora(model, SPEC, seed=42)
    expected = encode_batch(model, SPEC, init, texts, EncodeConfig(), tokenizer.pad_token_id).weights
    # The records share passages: each distinct text trains once (both ranks' tokens), its ids share a bank row.
    distinct = list({record["passages"][p]: texts[3 * n + p] for n, record in enumerate(records)
                     for p in range(3)}.values())
    assert len(distinct) < len(texts) and summary["tokens"] == training_tokens(distinct, EncodeConfig())
    index = json.loads((out / "index.json").read_text())
    assert sum(shard["passages"] for shard in index["shards"].values()) == len(distinct) == summary["distinct_now"]
    loaded = bank.load([f"{r['test_id']}_{p}" for r in records for p in range(3)])
    for name in expected:
        torch.testing.assert_close(loaded[name][0], expected[name][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded[name][1], expected[name][1], atol=1e-5, rtol=0)
