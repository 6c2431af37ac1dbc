"""DyPRAG part 2: the parameter projector, its training stage on DeepSpeed, generated adapters, DyPRAG rows."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import launch, run_stage, stage_env
from safetensors.torch import load_file

from dyprag.bank import LoraBank
from dyprag.lora import LoraSpec, inject_lora, save_peft_adapter, select, target_module_names
from dyprag.padding import pad_rows
from dyprag.projector_model import (Projector, ProjectorConfig, ProjectorLoras, combine_loras, distillation_losses,
                                    load_projector, passage_hidden, qa_text, tokenize_passages)

from stages.core.arguments import IGNORE_INDEX

SPEC = LoraSpec()
PAIRS = 8  # --max_samples 8 demo_qa records: one (first passage, record question) pair each


@pytest.fixture(scope="module")
def records(demo_data):
    return json.loads((demo_data / "demo_qa.json").read_text())[:PAIRS]


@pytest.fixture(scope="module")
def bank_dir(tiny_model, demo_data, tmp_path_factory) -> Path:
    """Part 1's output for 8 demo records (24 passages); a high lr so the teachers differ from the base."""
    out = tmp_path_factory.mktemp("projector") / "bank"
    run_stage("encode", "--model_name_or_path", tiny_model, "--input_file", demo_data / "demo_qa.json",
              "--output_dir", out, "--max_samples", PAIRS, "--learning_rate", "1e-2", "--num_train_epochs", "3",
              "--report_to", "none")
    return out


def projector_args(tiny_model, demo_data, bank_dir, out, *extra) -> list:
    return ["--model_name_or_path", tiny_model, "--data_file", demo_data / "demo_qa.json", "--max_samples", PAIRS,
            "--bank_dir", bank_dir, "--output_dir", out, "--learning_rate", "3e-3",
            "--per_device_train_batch_size", "2", "--report_to", "none", *extra]


@pytest.fixture(scope="module")
def trained(tiny_model, demo_data, bank_dir) -> Path:
    """One process (no launcher): 3 epochs of 4 steps, a checkpoint every 4 steps, W&B offline (next to OUT)."""
    out, wandb_dir = bank_dir.parent / "one_process", bank_dir.parent / "wandb"
    wandb_dir.mkdir()
    run_stage("projector", *projector_args(tiny_model, demo_data, bank_dir, out, "--max_steps", "12",
                                           "--save_steps", "4", "--report_to", "wandb"),
              env=stage_env(WANDB_MODE="offline", WANDB_DIR=str(wandb_dir)))
    return out


def _hidden(model, tokenizer, texts):
    return passage_hidden(model, tokenize_passages(tokenizer, texts, 512), tokenizer.pad_token_id)


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits


IDS = torch.randint(4, 1000, (2, 14), generator=torch.Generator().manual_seed(0))


def _adds(delta):
    """A forward hook adding x @ delta^T to a linear layer's output: the original's unscaled LoRA delta."""
    return lambda module, args, out: out + args[0] @ delta.T


def test_projector_starts_near_zero(model, tokenizer, records):
    torch.manual_seed(0)
    projector = Projector(ProjectorConfig.for_model(model, SPEC))
    generated = projector(_hidden(model, tokenizer, [r["passages"][0] for r in records[:2]]))
    assert list(generated) == target_module_names(model, SPEC)
    for name, (lora_a, lora_b) in generated.items():
        module = model.get_submodule(name)
        assert lora_a.shape == (2, SPEC.rank, module.in_features) and lora_b.shape == (2, module.out_features, 2)
        assert 0 < lora_a.abs().max() < 1e-3 and 0 < lora_b.abs().max() < 1e-3  # near zero, not dead
    with inject_lora(model, generated, SPEC.scaling):
        injected = _logits(model, IDS)
    torch.testing.assert_close(injected, _logits(model, IDS), atol=1e-5, rtol=0)


def test_loss_terms_equal_a_per_sample_reference(model, tokenizer, records, bank_dir):
    """Batched, padded distillation_losses == per-sample unpadded sums over answer tokens; only the projector
    gets gradients."""
    import torch.nn.functional as F

    bank = LoraBank(bank_dir)
    real = bank.load(["0_0", "4_0"])
    texts = [qa_text(tokenizer, records[i]["question"], records[i]["answer"][0]) for i in (0, 4)]
    texts[1] = (texts[1][0] + [5, 6, 7], texts[1][1])  # different lengths: the first row gets padding
    input_ids = pad_rows([t for t, _ in texts], tokenizer.pad_token_id)
    labels = pad_rows([[IGNORE_INDEX] * start + text[start:] for text, start in texts], IGNORE_INDEX)
    torch.manual_seed(0)
    projector = Projector(ProjectorConfig.for_model(model, SPEC, init_std=1e-2))
    generated = projector(_hidden(model, tokenizer, [records[i]["passages"][0] for i in (0, 4)]))
    terms = distillation_losses(model, generated, real, SPEC.scaling, input_ids, labels)

    nll, kl, tokens = 0.0, 0.0, 0
    for row, (text, start) in enumerate(texts):
        ids = torch.tensor([text])
        with inject_lora(model, select(real, row), SPEC.scaling):
            teacher = _logits(model, ids)[0, start - 1:-1].log_softmax(-1)
        with torch.no_grad(), inject_lora(model, select(generated, row), SPEC.scaling):
            student = _logits(model, ids)[0, start - 1:-1].log_softmax(-1)
        nll -= student.gather(1, ids[0, start:, None]).sum()
        kl += (teacher.exp() * (teacher - student)).sum()
        tokens += len(text) - start
    torch.testing.assert_close(terms["lm"].detach(), nll / tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(terms["kl"].detach(), kl / tokens, atol=1e-6, rtol=1e-4)
    mse = sum(F.mse_loss(generated[n][0], a) + F.mse_loss(generated[n][1], b) for n, (a, b) in real.items())
    torch.testing.assert_close(terms["mse"].detach(), mse.detach())
    assert terms["kl"] > 0
    exact = distillation_losses(model, real, real, SPEC.scaling, input_ids, labels)
    assert exact["kl"].abs() < 1e-6 and exact["mse"] == 0
    torch.testing.assert_close(exact["lm"], exact["teacher_lm"])

    (terms["lm"] + terms["kl"] + terms["mse"]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_original_objective_equals_the_originals_step_without_padding(model, tokenizer, records, bank_dir):
    """objective original: the student's B@A unscaled (train_dyprag.py's delta in the MLP), LM the mean over every
    token of the texts (HF's loss), KL F.kl_div(batchmean) per text summed, the texts averaged; pads never count."""
    bank = LoraBank(bank_dir)
    real = bank.load(["0_0", "4_0"])
    texts = [qa_text(tokenizer, records[i]["question"], records[i]["answer"][0], [records[i]["passages"][0]])[0]
             for i in (0, 4)]
    texts[1] = texts[1] + [5, 6, 7]  # different lengths: the first row gets padding
    input_ids = pad_rows(texts, tokenizer.pad_token_id)
    labels = pad_rows(texts, IGNORE_INDEX)
    torch.manual_seed(0)
    projector = Projector(ProjectorConfig.for_model(model, SPEC, init_std=1e-2))
    generated = projector(_hidden(model, tokenizer, [records[i]["passages"][0] for i in (0, 4)]))
    terms = distillation_losses(model, generated, real, SPEC.scaling, input_ids, labels, student_scaling=1.0,
                                kl_per_text=True)

    nll, kl, tokens = 0.0, 0.0, 0
    for row, text in enumerate(texts):
        ids = torch.tensor([text])
        with inject_lora(model, select(real, row), SPEC.scaling):  # the teacher: peft's alpha/r
            teacher = _logits(model, ids)
        handles = [model.get_submodule(name).register_forward_hook(_adds((b[row] @ a[row]).detach()))
                   for name, (a, b) in generated.items()]
        try:
            with torch.no_grad():
                student = model(input_ids=ids, labels=ids)
        finally:
            for handle in handles:
                handle.remove()
        nll += student.loss * (len(text) - 1)  # HF's causal LM loss: the mean over the text's predicted tokens
        kl += torch.nn.functional.kl_div(student.logits[0, :-1].log_softmax(-1), teacher[0, :-1].softmax(-1),
                                         reduction="batchmean") * (len(text) - 1)  # batchmean at batch 1: the sum
        tokens += len(text) - 1
    torch.testing.assert_close(terms["lm"].detach(), nll / tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(terms["kl"].detach(), kl / len(texts), atol=1e-5, rtol=1e-4)
    answer_only = distillation_losses(model, generated, real, SPEC.scaling, input_ids, labels)
    assert terms["kl"] > 10 * answer_only["kl"]  # a sum over each text's tokens, not a mean


def test_pairs_meet_their_lora_by_key_in_any_record_order(tokenizer, records, bank_dir):
    """A passage's teacher is the bank row of its own key "<test_id>_<pid>", whatever order the records come in
    (the original matches its projector's passages with the encoded LoRAs by position)."""
    from stages.core.projector_trainer import Teachers
    from stages.core.dyprag_arguments import ProjectorArguments
    from stages.projector import build_pairs

    bank = LoraBank(bank_dir)
    args = ProjectorArguments(data_file="records.json", bank_dir=str(bank_dir))
    pairs, _ = build_pairs(list(reversed(records)), None, tokenizer, args)
    by_id = {str(r["test_id"]): r for r in records}
    assert [p.passage_id for p in pairs] == [f"{r['test_id']}_0" for r in reversed(records)]
    teachers = Teachers(bank, pairs, in_memory=True)(pairs, torch.device("cpu"))
    for row, pair in enumerate(pairs):
        test_id, pid = pair.passage_id.rsplit("_", 1)
        assert pair.passage == tokenize_passages(tokenizer, [by_id[test_id]["passages"][int(pid)]], 512)[0]
        for name, (lora_a, lora_b) in bank.load([pair.passage_id]).items():
            torch.testing.assert_close(teachers[name][0][row], lora_a[0])
            torch.testing.assert_close(teachers[name][1][row], lora_b[0])


def test_combinations(model):
    generator = torch.Generator().manual_seed(1)
    loras = [{name: (torch.randn(1, 2, 64, generator=generator), torch.randn(1, 192, 2, generator=generator))
              for name in ("a",)} for _ in range(3)]
    factors = combine_loras(loras, "factors")["a"]
    torch.testing.assert_close(factors[0], sum(lora["a"][0] for lora in loras) / 3)
    torch.testing.assert_close(factors[1], sum(lora["a"][1] for lora in loras) / 3)
    lora_a, lora_b = combine_loras(loras, "deltas")["a"]
    assert lora_a.shape == (1, 6, 64)  # rank k*r
    torch.testing.assert_close(lora_b[0] @ lora_a[0], sum(lora["a"][1][0] @ lora["a"][0][0] for lora in loras) / 3)


def test_one_process_training(trained, tiny_model, model, demo_data, bank_dir, tmp_path):
    log = [json.loads(line) for line in (trained / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    epoch = {e: {k: sum(r[k] for r in log[4 * e:4 * e + 4]) / 4 for k in ("loss", "lm_loss", "mse_loss")}
             for e in (0, 2)}  # every epoch sees the same 8 pairs
    for key in ("loss", "lm_loss", "mse_loss"):
        assert epoch[2][key] < epoch[0][key], key
    assert all(set(r) >= {"kl_loss", "teacher_lm_loss", "learning_rate"} for r in log)
    # Every term of every step went to W&B too.
    from test_wandb import read_wandb_records

    history = {}
    for record in read_wandb_records(next((trained.parent / "wandb").rglob("*.wandb"))):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[row["_step"]] = row
    for r in log:
        assert {k: history[r["step"]][f"projector/{k}"] for k in ("loss", "lm_loss", "kl_loss", "mse_loss")} == \
            {k: r[k] for k in ("loss", "lm_loss", "kl_loss", "mse_loss")}
    # The projector trained away from its (seeded) initialisation; the base model is never written.
    from transformers import set_seed

    set_seed(42)
    initial = Projector(ProjectorConfig.for_model(model, SPEC)).state_dict()
    final = load_file(str(trained / "projector.safetensors"))
    assert set(final) == set(initial) and all(not torch.equal(final[k], initial[k]) for k in final)
    assert not list(trained.rglob("*.bin")) and not list(trained.rglob("*.pt")) and not list(trained.rglob("*.pth"))
    assert sorted(p.name for p in trained.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]
    for checkpoint in trained.glob("checkpoint-*"):
        assert {p.name for p in checkpoint.iterdir()} == {"projector.safetensors", "projector_config.json",
                                                          "optimizer.safetensors", "rng.safetensors",
                                                          "trainer_state.json"}
    # Resuming from step 4 in another folder reproduces the uninterrupted run.
    resumed = tmp_path / "resumed"
    run_stage("projector", *projector_args(tiny_model, demo_data, bank_dir, resumed, "--max_steps", "12",
                                           "--save_steps", "4", "--resume_from_checkpoint", trained / "checkpoint-4"))
    assert [json.loads(line)["step"] for line in (resumed / "trainer_log.jsonl").read_text().splitlines()] == \
        list(range(5, 13))
    again = load_file(str(resumed / "projector.safetensors"))
    for key in final:
        torch.testing.assert_close(again[key], final[key], atol=1e-6, rtol=0)


def test_generated_adapter_loads_with_plain_peft(trained, model, tokenizer, records, tmp_path):
    from peft import PeftModel

    projector = load_projector(trained)
    passages = [r["passages"][0] for r in records[:3]]
    generated = ProjectorLoras(projector, model, tokenizer).generate(passages)
    base = _logits(model, IDS)
    # One passage, written in-process; three combined by averaging deltas, written by the export stage.
    save_peft_adapter(generated, 0, SPEC, "tiny", tmp_path / "one")
    (tmp_path / "passages.json").write_text(json.dumps(passages))
    run_stage("projector_export", "--projector_dir", trained, "--passages_file", tmp_path / "passages.json",
              "--combination", "deltas", "--output_dir", tmp_path / "three")
    assert json.loads((tmp_path / "three" / "adapter_config.json").read_text())["r"] == 3 * SPEC.rank
    three = combine_loras([select(generated, i) for i in range(3)], "deltas")
    for folder, lora in ((tmp_path / "one", select(generated, 0)), (tmp_path / "three", three)):
        expected = _logits(PeftModel.from_pretrained(copy.deepcopy(model), folder).eval(), IDS)
        with inject_lora(model, lora, SPEC.scaling):
            injected = _logits(model, IDS)
        assert (expected - base).abs().max() > 1e-4  # the generated LoRA does something
        torch.testing.assert_close(injected, expected, atol=1e-5, rtol=1e-5)


def test_a_translator_named_folder_of_release_0_1_0_still_loads_and_exports(trained, tmp_path):
    """A projector folder whose files and format carry the 0.1.0 names (translator_config.json,
    translator.safetensors, "dyprag-translator") loads with the same weights and exports an adapter."""
    old = tmp_path / "old"
    old.mkdir()
    config = json.loads((trained / "projector_config.json").read_text())
    (old / "translator_config.json").write_text(json.dumps({**config, "format": "dyprag-translator"}))
    shutil.copy(trained / "projector.safetensors", old / "translator.safetensors")
    loaded, current = load_projector(old).state_dict(), load_projector(trained).state_dict()
    assert loaded.keys() == current.keys()
    assert all(torch.equal(loaded[key], current[key]) for key in current)
    run_stage("projector_export", "--projector_dir", old, "--passage", "Kreilshom is a city.",
              "--output_dir", tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_prag_eval_gains_dyprag_rows(trained, tiny_model, demo_data, bank_dir, tmp_path):
    out = tmp_path / "eval"
    run_stage("prag_eval", "--model_name_or_path", tiny_model, "--data_file", demo_data / "demo_qa.json",
              "--max_samples", "4", "--bank_dir", bank_dir, "--projector_dir", trained, "--output_dir", out,
              "--report_to", "none")
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [r["method"] for r in rows] == ["vanilla", "rag", "prag", "prag_combine", "dyprag", "dyprag_combine"]
    assert all(r["questions"] == 4 for r in rows)
    assert "| dyprag_combine | 4 |" in (out / "results.md").read_text()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_two_ranks_zero2_train_save_and_resume_and_zero3(tiny_model, demo_data, bank_dir, tmp_path):
    out = tmp_path / "two_ranks"
    weights = tiny_model / "model.safetensors"
    before = _sha256(weights)
    args = projector_args(tiny_model, demo_data, bank_dir, out, "--max_steps", "4", "--save_steps", "2",
                          "--deepspeed", "ds_configs/zero2.json")
    launch("projector", *args)
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["steps_per_epoch"] == 2  # 8 pairs / (2 ranks x 2)
    final = load_file(str(out / "projector.safetensors"))
    assert not torch.equal(final["kinds.up_proj.w_b"], load_file(str(out / "checkpoint-2" / "projector.safetensors"))
                           ["kinds.up_proj.w_b"])
    # As if killed after step 2: resume `last` picks checkpoint-2 and continues the step count to 4.
    shutil.rmtree(out / "checkpoint-4")
    (out / "projector.safetensors").unlink()
    launch("projector", *args, "--resume_from_checkpoint", "last")
    steps = [json.loads(line)["step"] for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 3, 4]
    again = load_file(str(out / "projector.safetensors"))
    for key in final:
        torch.testing.assert_close(again[key], final[key], atol=1e-6, rtol=0)
    # ZeRO-3: the frozen model partitioned across the ranks (the projector under ZeRO-2) trains the same projector.
    partitioned = tmp_path / "zero3"
    result = launch("projector", *projector_args(tiny_model, demo_data, bank_dir, partitioned, "--max_steps", "4",
                                                 "--save_steps", "2", "--deepspeed", "ds_configs/zero3.json"))
    line = next(line for line in result.stderr.splitlines() if "frozen model partitioned" in line)  # rank 0's
    held, _, _, total = line.split("holds ")[1].split()[:4]
    assert 0 < int(held) <= int(total) // 2 + 1000, line  # half of the weights (+ padding) on each of 2 ranks
    zero3 = load_file(str(partitioned / "projector.safetensors"))
    for key in final:
        torch.testing.assert_close(zero3[key], final[key], atol=1e-5, rtol=0)
    assert _sha256(weights) == before  # the frozen base is never written


def test_the_originals_texts_and_objective_train(tiny_model, tmp_path):
    """--qa_pairs first --qa_with_passage --with_cot: one chain-of-thought text per passage, with the passage in
    context and the QA's full_answer; --objective original saves a projector injected unscaled (alpha = r)."""
    from helpers import SHARED_DATA

    real = SHARED_DATA / "prag_augmented" / "complexwebquestions_llama3.2-1b_46.json"
    if not real.is_file():
        pytest.skip(f"real PRAG records {real} are absent")
    fewshot = tmp_path / "fewshot.json"
    fewshot.write_text(json.dumps([{"question": "Who wrote Hamlet?",
                                    "answer": "Hamlet is a play by Shakespeare. So the answer is Shakespeare."}]))
    bank, out = tmp_path / "bank", tmp_path / "projector"
    run_stage("encode", "--model_name_or_path", tiny_model, "--input_file", real, "--output_dir", bank,
              "--max_samples", "2", "--cutoff_len", "256", "--passages_per_batch", "6", "--report_to", "none")
    result = run_stage("projector", "--model_name_or_path", tiny_model, "--data_file", real, "--max_samples", "2",
                       "--bank_dir", bank, "--output_dir", out, "--max_steps", "2", "--cutoff_len", "2048",
                       "--max_passage_length", "256", "--qa_pairs", "first", "--qa_with_passage", "--with_cot",
                       "--fewshot_file", fewshot, "--objective", "original", "--report_to", "none")
    passages = sum(len(r["augment"]) for r in json.loads(real.read_text())[:2])
    assert f"{passages} training pairs (dropped: 0 longer" in result.stderr  # one text per passage
    config = json.loads((out / "projector_config.json").read_text())
    assert config["spec"]["alpha"] == config["spec"]["rank"] == 2
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["loss"] == r["loss"] for r in log)  # finite, not NaN

    from transformers import AutoTokenizer

    from stages.core.dyprag_arguments import ProjectorArguments
    from stages.projector import build_pairs
    from dyprag.prompts import read_fewshot

    record = json.loads(real.read_text())[0]
    args = ProjectorArguments(data_file=str(real), bank_dir=str(bank), qa_pairs="first", qa_with_passage=True,
                              with_cot=True, fewshot_file=str(fewshot))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    pairs, _ = build_pairs([record], "llama3.2-1b-instruct", tokenizer, args, read_fewshot(str(fewshot)))
    first = record["augment"][0]
    text = tokenizer.decode(pairs[0].text)
    assert len(pairs) == len(record["augment"]) and "So the answer is Shakespeare" in text
    assert first["passage"][:40] in text and text.endswith(first["llama3.2-1b-instruct_qa"][0]["full_answer"])


def test_real_records_train_and_answer(tiny_model, tmp_path):
    """The published augmented records: QA pairs from `<model>_qa` (name detected), projector, DyPRAG answers."""
    from helpers import SHARED_DATA

    real = SHARED_DATA / "prag_augmented" / "complexwebquestions_llama3.2-1b_46.json"
    if not real.is_file():
        pytest.skip(f"real PRAG records {real} are absent")
    bank, out = tmp_path / "bank", tmp_path / "projector"
    run_stage("encode", "--model_name_or_path", tiny_model, "--input_file", real, "--output_dir", bank,
              "--max_samples", "2", "--cutoff_len", "256", "--passages_per_batch", "6", "--report_to", "none")
    result = run_stage("projector", "--model_name_or_path", tiny_model, "--data_file", real, "--max_samples", "2",
                       "--bank_dir", bank, "--output_dir", out, "--max_steps", "2", "--cutoff_len", "1024",
                       "--max_passage_length", "256", "--qa_with_passage", "--report_to", "none")
    qa_pairs = sum(len(entry["llama3.2-1b-instruct_qa"]) for r in json.loads(real.read_text())[:2]
                   for entry in r["augment"])
    assert f"{qa_pairs} training pairs (dropped: 0 longer" in result.stderr  # every QA pair of every passage
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["loss"] == r["loss"] for r in log)  # finite, not NaN
    run_stage("prag_eval", "--model_name_or_path", tiny_model, "--data_file", real, "--max_samples", "2",
              "--projector_dir", out, "--methods", "dyprag,dyprag_combine", "--output_dir", tmp_path / "eval",
              "--report_to", "none")
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    assert [r["method"] for r in rows] == ["dyprag", "dyprag_combine"]
