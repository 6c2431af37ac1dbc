"""stages.report on a fake pipeline folder written in the stages' own formats: every figure holds its data
(one point still visible), the results chart and table per question set, sample answers, copyable commands."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import ROOT, run_stage
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ZERO2 = str(ROOT / "ds_configs" / "zero2.json")  # what launching.stage_argv adds, absolute
# What each stage's figure must draw: one set of series per chart, in order.
EXPECTED_CHARTS = {
    "pt": [{"loss", "eval_loss"}],
    "sft": [{"eval_loss", "train_loss"}],  # a run shorter than logging_steps: its run mean beside its one eval
    "rm": [{"loss", "eval_loss"}, {"eval_accuracy"}, {"eval_margin"}],
    "ppo": [{"objective/scores"}, {"objective/kl"}, {"objective/entropy"}, {"loss/policy_avg", "loss/value_avg"}],
    "encode": [{"first_epoch_loss", "loss"}],
    "projector": [{"lm_loss", "teacher_lm_loss", "kl_loss", "mse_loss"}, {"loss"}],
}
QUESTIONS = [("What is the capital of Veldor?", ["Ostrig"]), ("When was Ostrig founded?", ["1253", "in 1253"]),
             ("Which river flows through Ostrig?", ["the Brae", "Brae"]), ("Who founded Ostrig?", ["Anna Kell"]),
             ("What does Ostrig export?", ["wool"])]


def _hf_log(folder: Path, records: list[tuple[int, dict]]) -> None:
    """trainer_log.jsonl as the HF stages and ppo write it: stages.core.callbacks.JsonlLogCallback on each log."""
    from stages.core.callbacks import JsonlLogCallback

    callback = JsonlLogCallback()
    for step, logs in records:
        state = SimpleNamespace(is_world_process_zero=True, global_step=step, epoch=step / 10)
        callback.on_log(SimpleNamespace(output_dir=str(folder)), state, None, logs=dict(logs))


def _eval(step: int, loss: float, **metrics: float) -> tuple[int, dict]:
    return step, {"eval_loss": loss, **metrics, "eval_runtime": 0.05, "eval_samples_per_second": 40.0,
                  "eval_steps_per_second": 20.0}


def _summary(step: int, train_loss: float) -> tuple[int, dict]:  # the HF Trainer's end-of-run record
    return step, {"train_runtime": 0.8, "train_samples_per_second": 60.0, "train_steps_per_second": 3.9,
                  "total_flos": 8e9, "train_loss": train_loss}


def _stage(root: Path, name: str, stage: str, argv: list[str] | None = None, config_file: bool = True,
           **config: object) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    if config_file:
        values = {"stage": stage, **({"argv": argv} if argv is not None else {}), "output_dir": str(folder), **config}
        (folder / "run_config.json").write_text(json.dumps(values))
    return folder


def _prag_eval(folder: Path, methods: list[str], questions: int, config: dict, predictions_file: bool) -> None:
    """results.json (+ predictions.jsonl) as stages.prag_eval writes them, from answers scored by dyprag.scoring."""
    from dyprag.inference import results_table
    from dyprag.scoring import evaluate

    predictions = []
    for m, method in enumerate(methods):
        for i, (question, gold) in enumerate(QUESTIONS[:questions]):
            text = gold[0] if i < m else f"not {gold[0]}"  # method m gets its first m answers right
            score = evaluate(text, gold)
            predictions.append({"test_id": i, "question": question, "answer": gold, "method": method,
                                "generation": text, "prediction": score.prediction, "em": score.em, "f1": score.f1,
                                "precision": score.precision, "recall": score.recall})
    (folder / "results.json").write_text(json.dumps({"results": results_table(predictions), "config": config}))
    if predictions_file:
        with open(folder / "predictions.jsonl", "w", encoding="utf-8") as file:
            file.writelines(json.dumps(p) + "\n" for p in predictions)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """A pipeline folder: pt (dense loss, sparse evals), sft (a reduced run: one eval, no per-step loss), rm,
    ppo (TRL's statistics), encode, projector (stages.core.callbacks.log_step), two question sets, a foreign folder."""
    from dyprag.inference import METHODS
    from stages.core.callbacks import log_step
    from stages.core.projector_trainer import LOSS_KEYS

    runs = tmp_path_factory.mktemp("runs")
    pt = _stage(runs, "pt", "pt", ["examples/demo/pt.yaml", "--max_steps", "30"], model_name_or_path="runs/demo/m",
                deepspeed=ZERO2)
    _hf_log(pt, [*((s, {"loss": 3 + 3 / s, "grad_norm": 1.0, "learning_rate": 1e-3}) for s in range(1, 31)),
                 *(_eval(s, 2 + 2 / s) for s in (10, 20, 30)), _summary(30, 3.2)])
    (pt / "all_results.json").write_text(json.dumps({"train_loss": 3.2, "eval_loss": 2.07, "epoch": 3.0}))
    sft = _stage(runs, "sft", "sft",
                 ["examples/demo/sft.yaml", "--output_dir", str(ROOT / "runs" / "demo" / "sft"), "--num_train_epochs",
                  "3", f"--adapter_name_or_path={ROOT}/runs/demo/pt,{ROOT}/runs/demo/x"],
                 output_dir=str(ROOT / "runs" / "demo" / "sft"), model_name_or_path="runs/demo/pt", dataset="demo_sft",
                 deepspeed=ZERO2)
    _hf_log(sft, [_summary(3, 0.9), _eval(3, 0.4)])
    (sft / "all_results.json").write_text(json.dumps({"train_loss": 0.5, "eval_loss": 0.7, "eval_perplexity": 2.01}))
    rm = _stage(runs, "rm", "rm")  # recorded before run_config.json held argv
    _hf_log(rm, [(2, {"loss": 0.69}), (4, {"loss": 0.6}), (6, {"loss": 0.5}),
                 _eval(6, 0.9, eval_accuracy=0.75, eval_margin=1.5), _summary(6, 0.6)])
    (rm / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.75, "eval_margin": 1.5}))
    ppo = _stage(runs, "ppo", "ppo", [])
    _hf_log(ppo, [(s, {"eps": 4, "objective/kl": 0.01 * s, "objective/entropy": 170.0 + s,
                       "objective/non_score_reward": -0.001, "objective/rlhf_reward": 0.1 * s,
                       "objective/scores": 0.1 * s - 0.2, "policy/approxkl_avg": 1e-6, "policy/clipfrac_avg": 0.0,
                       "loss/policy_avg": -0.001 * s, "loss/value_avg": 0.5 - 0.05 * s, "val/clipfrac_avg": 0.0,
                       "policy/entropy_avg": 7.4, "val/ratio": 1.0, "val/ratio_var": 1e-9, "val/num_eos_tokens": 0,
                       "lr": 1e-4, "episode": 16 * s}) for s in range(1, 6)])
    encode = _stage(runs, "encode", "encode")
    for step in range(1, 5):
        log_step(encode, "encode", {"step": step, "passages": 9 * step, "loss": 1.0 / step, "first_epoch_loss": 6.0,
                                    "passages_per_second": 300.0})
    projector = _stage(runs, "projector", "projector", ["--output_dir", str(runs / "projector"), "--kl_weight", "0.5"])
    for step in range(1, 26):
        terms = dict(zip(LOSS_KEYS, (9 - step / 10, 7 - step / 10, 1e-4 * step, 0.02 - step / 2000, 3.0)))
        log_step(projector, "projector", {"step": step, "epoch": step / 25, **terms, "learning_rate": 1e-3,
                                          "samples_per_second": 40.0})
    world = _stage(runs, "prag_eval", "prag_eval", ["examples/demo/prag_eval.yaml"],
                   data_file="runs/demo/augment/a.json", split="test")
    _prag_eval(world, list(METHODS), 5, json.loads((world / "run_config.json").read_text()), predictions_file=True)
    # results.json alone (no run_config.json, no predictions.jsonl): prag_eval keeps its config there too
    _prag_eval(_stage(runs, "prag_eval_real", "prag_eval", config_file=False), ["vanilla", "rag", "prag"], 4,
               {"stage": "prag_eval", "argv": [], "data_file": "/data/hotpotqa.json"}, predictions_file=False)
    (runs / "not_a_stage").mkdir()
    return runs


def _points_visible(canvas, line) -> bool:
    """Every data point of `line`, rendered, shows its colour: an opaque marker there, or the (faint) stroke."""
    import numpy as np
    from matplotlib.colors import to_rgb

    pixels = np.asarray(canvas.buffer_rgba())[..., :3] / 255
    height, color = pixels.shape[0], np.array(to_rgb(line.get_color()))
    for x, y in line.axes.transData.transform(line.get_xydata()):
        patch = pixels[int(height - y) - 1:int(height - y) + 2, int(x) - 1:int(x) + 2].reshape(-1, 3)
        if line.get_marker() not in ("", "None", None):
            if not (abs(patch - color).max(axis=1) < 0.08).any():
                return False
        elif not (patch.max(axis=1) - patch.min(axis=1) > 0.1).any():  # coloured, not the white/grey background
            return False
    return True


def test_every_figure_holds_its_data(pipeline):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from stages.core.callbacks import read_log
    from stages.report import SPARSE, stage_config, stage_figures

    for stage, charts in EXPECTED_CHARTS.items():
        log = read_log(pipeline / stage)
        (name, figure), = stage_figures(stage, pipeline / stage).items()
        assert name == "curves"
        canvas = FigureCanvasAgg(figure)
        canvas.draw()  # rendered as savefig renders it
        drawn = [{line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
                 for ax in figure.axes]
        assert [set(lines) for lines in drawn] == charts, stage
        for ax, lines in zip(figure.axes, drawn):
            for key, line in lines.items():
                points = [(r["step"], r[key]) for r in log if key in r]
                assert [tuple(p) for p in line.get_xydata()] == points, (stage, key)
                if len(points) <= SPARSE:  # sparse: each point marked, so one point is seen
                    assert line.get_marker() == "o" and line.get_markersize() > 0 and line.get_alpha() == 1.0
                assert _points_visible(canvas, line), (stage, key)
                left, right = sorted(ax.get_xlim())
                bottom, top = sorted(ax.get_ylim())
                assert all(left <= x <= right and bottom <= y <= top for x, y in points), (stage, key)
    assert stage_figures("projector", pipeline / "projector")["curves"].axes[0].get_yscale() == "log"

    # Each question set: methods x {EM, F1} bars, the heights its results.json holds, in percent.
    for name in ("prag_eval", "prag_eval_real"):
        folder = pipeline / name
        rows = json.loads((folder / "results.json").read_text())["results"]
        (figure,) = stage_figures(stage_config(folder)["stage"], folder).values()
        (ax,) = figure.axes
        FigureCanvasAgg(figure).draw()
        assert [t.get_text() for t in ax.get_xticklabels()] == [r["method"] for r in rows]
        assert [c.get_label() for c in ax.containers] == ["EM", "F1"]
        for container, key in zip(ax.containers, ("em", "f1")):
            assert [bar.get_height() for bar in container] == pytest.approx([r[key] for r in rows])
        assert max(r["f1"] for r in rows) > 0 and ax.get_ylim()[1] >= max(r["f1"] for r in rows)
    # A stage with nothing to draw gets no figure, not an empty one.
    assert stage_figures("augment", pipeline / "not_a_stage") == {}


def _tables(markdown: str, first_header: str) -> list[list[list[str]]]:
    """Every markdown table whose first column is `first_header`: its rows of cells (no header)."""
    lines, tables = markdown.splitlines(), []
    for start, line in enumerate(lines):
        if line.startswith(f"| {first_header} |"):
            rows = []
            for row in lines[start + 2:]:
                if not row.startswith("|"):
                    break
                rows.append([cell.strip() for cell in row.strip("|").split("|")])
            tables.append(rows)
    return tables


def test_report_page(pipeline, tmp_path):
    output = tmp_path / "report" / "report.md"
    run_stage("report", "--output", output, "--pipeline_dir", pipeline, pipeline / "not_a_stage")
    markdown = output.read_text()
    page = output.with_suffix(".html").read_text()

    # One figure per stage (six curve figures) and one chart per question set, each a valid PNG beside the
    # markdown and embedded in the HTML.
    images = re.findall(r"!\[([^\]]*)\]\(([^)]+)\)", markdown)
    assert sorted(alt for alt, _ in images) == sorted([f"{s} curves" for s in EXPECTED_CHARTS] +
                                                      ["prag_eval results", "prag_eval_real results"])
    assert len(images) == page.count("data:image/png;base64,")
    for alt, link in images:
        assert f"<img alt='{alt}' src='data:image/png;base64," in page
        path = output.parent / link
        assert path.read_bytes().startswith(PNG_SIGNATURE)
        with Image.open(path) as image:
            image.verify()

    # Each question set: its file and size, its table beside its chart, in percent as in results.json.
    assert "Question set: runs/demo/augment/a.json, split test; 5 questions per method." in markdown
    assert "Question set: /data/hotpotqa.json; 4 questions per method." in markdown
    tables = _tables(markdown, "method")
    for name, table in zip(("prag_eval", "prag_eval_real"), tables, strict=True):
        rows = json.loads((pipeline / name / "results.json").read_text())["results"]
        assert [row[0] for row in table] == [r["method"] for r in rows]
        for row, source in zip(table, rows):
            assert int(row[1]) == source["questions"]
            assert [float(c) for c in row[2:]] == [round(source[k], 2) for k in ("em", "f1", "precision",
                                                                                 "recall")]
        assert re.search(rf"<div class='side'><table><tr><th>method</th>.*?</table><img alt='{name} results'", page)

    # Sample answers where predictions.jsonl exists: question, gold aliases, each method's answer.
    (samples,) = _tables(markdown, "question")
    predictions = [json.loads(line) for line in (pipeline / "prag_eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(samples) == 3
    for row, (question, gold) in zip(samples, QUESTIONS):
        answers = [p["prediction"] for p in predictions if p["question"] == question]
        assert row == [question, " / ".join(gold), *answers]
    assert markdown.count("Sample answers") == 1  # none for the set without predictions.jsonl

    # rm accuracy and the metrics tables parse.
    assert re.search(r"accuracy[^\n]*: 0\.7500", markdown)
    metrics = [{name: float(value) for name, value in table} for table in _tables(markdown, "metric")]
    assert {"train_loss": 0.5, "eval_loss": 0.7, "eval_perplexity": 2.01} in metrics
    assert {"eval_accuracy": 0.75, "eval_margin": 1.5} in metrics

    # Stages follow the pipeline, every prag_eval* folder its own question set; absent stages and foreign
    # folders are named in a note.
    headings = re.findall(r"^## (\w+): (\S+)", markdown, flags=re.M)
    assert [h for h, _ in headings] == ["pt", "sft", "rm", "ppo", "encode", "projector", "prag_eval", "prag_eval"]
    assert headings[-1][1].endswith("prag_eval_real")
    assert re.search(r"Not in this report.*: augment\.", markdown)
    assert "not_a_stage" in markdown


def test_reproduce_commands_are_copyable(pipeline, tmp_path):
    """The recorded argv through the launch script, key flags added when a file gave them, paths under the
    repository relative to its root (where the commands run) and others as they were."""
    output = tmp_path / "report.md"
    run_stage("report", "--output", output, "--pipeline_dir", pipeline)
    commands = {shlex.split(c)[1]: shlex.split(c) for c in re.findall(r"```bash\n(.*)\n```", output.read_text())}
    sft = commands["launch/sft.sh"]
    assert sft[:8] == ["bash", "launch/sft.sh", "examples/demo/sft.yaml", "--output_dir", "runs/demo/sft",
                       "--num_train_epochs", "3", "--adapter_name_or_path=runs/demo/pt,runs/demo/x"]
    assert sft[8:] == ["--model_name_or_path", "runs/demo/pt", "--dataset", "demo_sft", "--deepspeed",
                       "ds_configs/zero2.json"]
    assert commands["launch/pt.sh"][2:5] == ["examples/demo/pt.yaml", "--max_steps", "30"]
    assert str(ROOT) not in output.read_text()
    # Outside the repository a path stays absolute; a run recorded without argv gets the key flags.
    projector = commands["launch/projector.sh"]
    assert projector[2:6] == ["--output_dir", str(pipeline / "projector"), "--kl_weight", "0.5"]
    assert commands["launch/rm.sh"][2:] == ["--output_dir", str(pipeline / "rm")]


def test_report_user_errors(tmp_path):
    result = run_stage("report", "--output", tmp_path / "r.md", tmp_path / "missing", check=False)
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_run_config_records_argv(monkeypatch):
    from stages.core.stage import resolved_config

    monkeypatch.setattr("sys.argv", ["launch/sft.sh", "--local_rank=1", "cfg.yaml", "--hub_token", "abc",
                                     "--output_dir", "out"])
    config = resolved_config("sft")
    assert config["argv"] == ["cfg.yaml", "--hub_token", "<redacted>", "--output_dir", "out"]
