"""rm: the reward model learns a preference, and its value head survives saving and loading.

Synthetic preference a tiny model can learn: the chosen answer names a landmark (river, garden,
lamp, ...) at a random place, the rejected one has a word of another set there (city, bridge,
...), the rest is shared; so only that property separates them, and a fresh head, which
orders the twelve words at random, ranks the pairs near chance. The saved model must give, with
plain transformers, the very scores the run computed (under ZeRO-3 too), and a missing or
mismatched head must never load quietly.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from helpers import ROOT, launch, run_stage, stage_env

GOOD = "river garden lamp castle tower stone".split()
BAD = "city bridge clock mountain teal white".split()
FILL = "the a was born in famous for its colour who what country blue year".split()


def _pairs(rng: random.Random, count: int) -> list[dict[str, str]]:
    rows = []
    for _ in range(count):
        words = [rng.choice(FILL) for _ in range(rng.randint(4, 8))]
        at = rng.randrange(len(words) + 1)
        rows.append({"instruction": rng.choice(["Describe the place.", "Say something.", "Tell me about it."]),
                     "chosen": " ".join(words[:at] + [rng.choice(GOOD)] + words[at:]),
                     "rejected": " ".join(words[:at] + [rng.choice(BAD)] + words[at:])})
    return rows


@pytest.fixture(scope="module")
def river_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("river")
    rng = random.Random(0)
    columns = {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}
    info = {}
    for name, count in (("river_train", 192), ("river_eval", 48)):
        (folder / f"{name}.json").write_text(json.dumps(_pairs(rng, count)))
        info[name] = {"file_name": f"{name}.json", "ranking": True, "columns": columns}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    return folder


def _pair_inputs(model_dir: Path, river_data: Path, name: str = "river_eval") -> dict[str, list[list[int]]]:
    """The evaluation pairs tokenized by the project's own pipeline (what the run scored)."""
    from transformers import AutoTokenizer

    from stages.core.data.loading import load_aligned
    from stages.core.data.processors import pairwise
    from stages.core.data.template import get_template
    from stages.core.arguments import DataArguments

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = load_aligned([name], DataArguments(dataset=name, dataset_dir=str(river_data)), seed=42, ranking=True)
    return pairwise(rows[:], tokenizer, get_template(tokenizer, None), cutoff_len=1024)


def _scores(model, inputs: dict[str, list[list[int]]]) -> torch.Tensor:
    """(n, 2) chosen/rejected scores, one unpadded row at a time."""
    with torch.no_grad():
        return torch.tensor([[model(input_ids=torch.tensor([ids])).logits.item() for ids in (chosen, rejected)]
                             for chosen, rejected in zip(inputs["chosen_input_ids"], inputs["rejected_input_ids"])])


def _predictions(out: Path) -> torch.Tensor:
    rows = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    return torch.tensor([[row["chosen"], row["rejected"]] for row in rows])


def test_rm_learns_a_synthetic_preference(tiny_model, river_data, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from stages.core.callbacks import read_log

    out = tmp_path / "rm"
    run_stage("rm", "--model_name_or_path", tiny_model, "--dataset", "river_train", "--eval_dataset", "river_eval",
              "--dataset_dir", river_data, "--output_dir", out, "--do_train", "--do_eval", "--do_predict",
              "--max_steps", "24", "--per_device_train_batch_size", "16", "--learning_rate", "5e-3",
              "--logging_steps", "4", "--eval_strategy", "steps", "--eval_steps", "12", "--eval_on_start", "true",
              "--report_to", "none", "--plot_loss", env=stage_env(OMP_NUM_THREADS="1"))

    log = read_log(out)
    accuracies = [r["eval_accuracy"] for r in log if "eval_accuracy" in r]
    losses = [r["loss"] for r in log if "loss" in r]
    # A fresh head ranks the held-out pairs at chance; trained, it ranks (almost) all correctly.
    assert accuracies[0] < 0.8 and accuracies[-1] >= 0.9, accuracies
    assert losses[-1] < losses[0] / 4, losses
    metrics = json.loads((out / "eval_results.json").read_text())
    assert metrics["eval_accuracy"] >= 0.9 and metrics["eval_margin"] > 0
    assert (out / "training_loss.png").is_file() and (out / "training_eval_accuracy.png").is_file()

    # A LoRA output: adapter weights and the trained head, nothing else.
    adapter = load_file(out / "adapter_model.safetensors")
    assert "base_model.model.score.weight" in adapter
    assert all("lora_" in key or key.endswith("score.weight") for key in adapter)

    # Plain transformers (PEFT integration) loads it as a one-label classifier and gives the
    # scores the run wrote, which are the metrics it reported.
    model = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1).eval()
    scores = _scores(model, _pair_inputs(tiny_model, river_data))
    torch.testing.assert_close(scores, _predictions(out), rtol=0, atol=1e-4)
    margin = scores[:, 0] - scores[:, 1]
    assert (margin > 0).float().mean().item() == pytest.approx(metrics["eval_accuracy"])
    assert margin.mean().item() == pytest.approx(metrics["eval_margin"], abs=1e-4)


@pytest.mark.slow
def test_rm_zero3_full_round_trip(tiny_model, river_data, tmp_path):
    """Full tuning under ZeRO-3 on two ranks: the gathered checkpoint holds the trained head."""
    from transformers import AutoModelForSequenceClassification

    from stages.core.arguments import FinetuningArguments, ModelArguments
    from stages.core.loader import load_model, load_tokenizer

    out = tmp_path / "rm"
    launch("rm", "--model_name_or_path", tiny_model, "--dataset", "river_train", "--eval_dataset", "river_eval",
           "--dataset_dir", river_data, "--max_samples", "16", "--output_dir", out, "--do_train", "--do_predict",
           "--finetuning_type", "full", "--max_steps", "4", "--per_device_train_batch_size", "4",
           "--learning_rate", "1e-3", "--report_to", "none", DS_CONFIG=str(ROOT / "ds_configs" / "zero3.json"))

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    inputs = _pair_inputs(tiny_model, river_data)
    inputs = {key: rows[:16] for key, rows in inputs.items()}
    expected = _predictions(out)  # computed by the run on its partitioned model
    assert expected.shape == (16, 2)
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    torch.testing.assert_close(_scores(plain, inputs), expected, rtol=0, atol=1e-4)
    ours = load_model(load_tokenizer(ModelArguments(model_name_or_path=str(out))),
                      ModelArguments(model_name_or_path=str(out)), FinetuningArguments(), is_trainable=False,
                      add_valuehead=True)
    torch.testing.assert_close(_scores(ours, inputs), expected, rtol=0, atol=1e-4)
    # The head was trained, not left at its fresh initialisation (std 1/sqrt(hidden+1)).
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    assert not torch.allclose(plain.score.weight, fresh.score.weight)


def test_rm_qlora_4bit(tiny_model, river_data, tmp_path):
    import bitsandbytes as bnb

    from stages.core.callbacks import read_log
    from stages.core.arguments import FinetuningArguments
    from stages.core.loader import load_model, load_tokenizer
    from stages.ppo import reward_model_args

    out = tmp_path / "rm"
    run_stage("rm", "--model_name_or_path", tiny_model, "--dataset", "river_train", "--dataset_dir", river_data,
              "--output_dir", out, "--do_train", "--quantization_bit", "4", "--max_steps", "12",
              "--per_device_train_batch_size", "16", "--learning_rate", "5e-3", "--logging_steps", "4",
              "--report_to", "none", env=stage_env(OMP_NUM_THREADS="1"))
    losses = [r["loss"] for r in read_log(out) if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0], losses

    # ppo rebuilds it as it was trained: the 4-bit base + the adapter with its head.
    args = reward_model_args(str(out))
    assert args.quantization_bit == 4 and args.adapters == [str(out)]
    model = load_model(load_tokenizer(args), args, FinetuningArguments(), is_trainable=False, add_valuehead=True)
    assert any(isinstance(module, bnb.nn.Linear4bit) for module in model.modules())
    pairs = _pair_inputs(tiny_model, river_data, "river_train")
    scores = _scores(model, {key: rows[:8] for key, rows in pairs.items()})
    assert torch.isfinite(scores).all() and (scores[:, 0] > scores[:, 1]).float().mean() >= 0.75


def test_rm_on_real_dpo_en_demo(tiny_model, real_data, tmp_path):
    """The real sharegpt ranking data (LLaMA-Factory's dpo_en_demo) through its registry entry."""
    out = tmp_path / "rm"
    run_stage("rm", "--model_name_or_path", tiny_model, "--dataset", "dpo_en_demo", "--dataset_dir", real_data,
              "--max_samples", "40", "--cutoff_len", "256", "--val_size", "8", "--output_dir", out, "--do_train",
              "--do_eval", "--do_predict", "--max_steps", "3", "--per_device_train_batch_size", "4",
              "--report_to", "none", env=stage_env(OMP_NUM_THREADS="1"))
    metrics = json.loads((out / "all_results.json").read_text())
    # The evaluation's accuracy and margin are those of the 8 held-out pairs' scores the run wrote.
    margin = _predictions(out)[:, 0] - _predictions(out)[:, 1]
    assert margin.shape == (8,) and math.isfinite(metrics["eval_margin"])
    assert metrics["eval_accuracy"] == pytest.approx((margin > 0).float().mean().item())
    assert metrics["eval_margin"] == pytest.approx(margin.mean().item(), abs=1e-5)
    assert math.isfinite(metrics["eval_loss"]) and math.isfinite(metrics["train_loss"])
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3


def test_value_head_missing_or_mismatched_is_refused(tiny_model, tmp_path):
    """Loading for inference never makes up a head: no head, or one of another shape, is an error."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from stages.core.errors import UserError
    from stages.core.arguments import FinetuningArguments, ModelArguments
    from stages.core.loader import load_model, load_tokenizer

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(tiny_model)))
    with pytest.raises(UserError, match="no value head in --model_name_or_path"):
        load_model(tokenizer, ModelArguments(model_name_or_path=str(tiny_model)), FinetuningArguments(),
                   is_trainable=False, add_valuehead=True)
    config = AutoConfig.from_pretrained(tiny_model)
    config.num_labels = 3
    AutoModelForSequenceClassification.from_pretrained(tiny_model, config=config).save_pretrained(tmp_path / "cls3")
    with pytest.raises(UserError, match="holds a value head of another shape"):
        load_model(tokenizer, ModelArguments(model_name_or_path=str(tmp_path / "cls3")), FinetuningArguments(),
                   is_trainable=False, add_valuehead=True)
    # Training may start from a causal LM: the head is then a fresh one, the same for a given seed.
    from transformers import set_seed

    heads = []
    for _ in range(2):
        set_seed(7)
        model = load_model(tokenizer, ModelArguments(model_name_or_path=str(tiny_model)),
                           FinetuningArguments(finetuning_type="full"), is_trainable=True, add_valuehead=True)
        heads.append(model.score.weight.detach().clone())
    torch.testing.assert_close(heads[0], heads[1], rtol=0, atol=0)
    assert heads[0].std().item() == pytest.approx(1 / math.sqrt(heads[0].shape[1] + 1), rel=0.3)
