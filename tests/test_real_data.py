"""pt and sft on real text nobody on the team wrote (../shared/data/llamafactory_demo), and the metrics.

The files are registered through a dataset_info.json entry of our own (the `real_data`
fixture), exactly as a user would register LLaMA-Factory's demo data; the tests skip with a
reason where that folder is absent. Runs are single-process and a few steps long.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


def _losses(out) -> list[float]:
    from stages.core.callbacks import read_log

    return [r["loss"] for r in read_log(out) if "loss" in r]


def test_pt_on_c4(real_data, tiny_model, tmp_path):
    from stages.pt import run_pt

    out = tmp_path / "pt_c4"
    run_pt(["--model_name_or_path", str(tiny_model), "--dataset", "c4_demo", "--dataset_dir", str(real_data),
            "--max_samples", "12", "--val_size", "2", "--cutoff_len", "64", "--output_dir", str(out),
            "--do_train", "--do_eval", "--max_steps", "6", "--learning_rate", "1e-2",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--logging_steps", "1",
            "--report_to", "none"])

    losses = _losses(out)
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses  # it starts learning the statistics of English web text
    metrics = json.loads((out / "eval_results.json").read_text())
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-9)


def test_sft_on_alpaca_then_predict_with_generate(real_data, tiny_model, tmp_path):
    from stages.core.similarity import similarity_scores
    from stages.sft import run_sft

    source = json.loads((real_data / "dataset_info.json").read_text())["alpaca_en_demo"]["file_name"]
    outputs = {row["output"] for row in json.loads(Path(source).read_text(encoding="utf-8"))}
    out = tmp_path / "sft_alpaca"
    run_sft(["--model_name_or_path", str(tiny_model), "--dataset", "alpaca_en_demo", "--dataset_dir",
             str(real_data), "--max_samples", "36", "--val_size", "4", "--cutoff_len", "128", "--output_dir",
             str(out), "--do_train", "--max_steps", "3", "--per_device_train_batch_size", "4", "--logging_steps", "1",
             "--do_predict", "--predict_with_generate", "--max_new_tokens", "8", "--per_device_eval_batch_size", "4",
             "--report_to", "none"])

    losses = _losses(out)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert (out / "adapter_model.safetensors").is_file()

    rows = [json.loads(line) for line in (out / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(set(row) == {"prompt", "predict", "label"} for row in rows)
    for row in rows:
        # The label is the held-out alpaca answer (cut to cutoff_len tokens), never part of the prompt.
        assert row["label"] and any(answer.startswith(row["label"][:40]) for answer in outputs), row["label"]
        assert row["label"][:40] not in row["prompt"]
    metrics = json.loads((out / "predict_results.json").read_text())
    expected = similarity_scores([row["predict"] for row in rows], [row["label"] for row in rows])
    each = [similarity_scores([row["predict"]], [row["label"]]) for row in rows]
    for key in ("rouge-1", "rouge-2", "rouge-l", "bleu-4"):
        assert metrics[f"predict_{key}"] == pytest.approx(expected[key])
        # A mean over the answers, each scored alone (not one corpus-level score).
        assert metrics[f"predict_{key}"] == pytest.approx(sum(s[key] for s in each) / len(each), abs=1e-3)


def test_similarity_scores_on_hand_checked_cases():
    from stages.core.similarity import similarity_scores

    keys = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
    same = similarity_scores(["the cat sat on the mat", "我爱北京天安门"], ["the cat sat on the mat", "我爱北京天安门"])
    assert all(same[k] == pytest.approx(100.0) for k in keys), same

    disjoint = similarity_scores(["alpha beta gamma delta", "今天天气很好"], ["one two three four", "我们去学校上课"])
    assert all(disjoint[k] == 0.0 for k in ("rouge-1", "rouge-2", "rouge-l")), disjoint
    assert disjoint["bleu-4"] < 5.0  # smoothed BLEU keeps a small floor for no shared n-gram

    # jieba: 我们|今天|去|公园 against 我们|今天|回家. Two of 4 vs 3 words shared: ROUGE-1 F =
    # 2*(2/4)*(2/3)/(2/4+2/3) = 57.14; one bigram of 3 vs 2 (我们 今天): ROUGE-2 = 2*(1/3)*(1/2)/(5/6) = 40;
    # the longest common subsequence is those two words, so ROUGE-L = ROUGE-1. BLEU-4 (characters)
    # shares the prefix 我们今天: strictly between the disjoint floor and 100.
    partial = similarity_scores(["我们今天去公园"], ["我们今天回家"])
    assert partial["rouge-1"] == pytest.approx(400 / 7, abs=1e-3)
    assert partial["rouge-2"] == pytest.approx(40.0, abs=1e-3)
    assert partial["rouge-l"] == pytest.approx(400 / 7, abs=1e-3)
    assert disjoint["bleu-4"] < partial["bleu-4"] < 100

    # Scores are means over the pairs: an identical pair and a disjoint pair average to 50.
    mixed = similarity_scores(["我们今天去公园", "alpha beta"], ["我们今天去公园", "one two"])
    assert all(mixed[k] == pytest.approx(50.0) for k in ("rouge-1", "rouge-2", "rouge-l")), mixed

    # An empty prediction scores 0 rather than crashing.
    assert similarity_scores([""], ["我们今天回家"]) == {k: 0.0 for k in keys}
