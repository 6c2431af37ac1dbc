"""stages.report on fake stage folders: the pages, valid PNGs, the results table, the commands."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from conftest import run_stage
from PIL import Image

METHODS = ("vanilla", "rag", "prag", "prag_combine", "dyprag", "dyprag_combine")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _stage_dir(root: Path, name: str, stage: str, log_keys: tuple[str, ...], argv: list[str] | None,
               **files: dict) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    config = {"stage": stage, "output_dir": str(folder), "model_name_or_path": "runs/demo/pt", "dataset": "demo_sft",
              "learning_rate": 1e-3}
    if argv is not None:
        config["argv"] = argv
    (folder / "run_config.json").write_text(json.dumps(config))
    with open(folder / "trainer_log.jsonl", "w") as file:
        for step in range(1, 6):
            file.write(json.dumps({"step": step, "epoch": step / 5, "learning_rate": 1e-3,
                                   **{key: 2.0 / step for key in log_keys}}) + "\n")
    for file_name, content in files.items():
        (folder / f"{file_name}.json").write_text(json.dumps(content))
    return folder


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


def test_report_from_stage_dirs(tmp_path):
    runs = tmp_path / "runs"
    _stage_dir(runs, "sft", "sft", ("loss", "eval_loss"),
               ["examples/demo/sft.yaml", "--output_dir", str(runs / "sft"), "--num_train_epochs", "3"],
               all_results={"train_loss": 0.5, "eval_loss": 0.7, "eval_perplexity": 2.01})
    _stage_dir(runs, "rm", "rm", ("loss", "eval_loss", "eval_accuracy"), None,
               all_results={"eval_accuracy": 0.75, "eval_margin": 1.5})
    _stage_dir(runs, "ppo", "ppo", ("objective/scores", "objective/kl", "loss/policy_avg", "val/clipfrac_avg"), [])
    _stage_dir(runs, "projector", "projector", ("loss", "lm_loss", "kl_loss", "mse_loss", "teacher_lm_loss"),
               ["--output_dir", str(runs / "projector"), "--kl_weight", "0.5"])
    rows = [{"method": m, "questions": 12, "em": 0.1 * i, "f1": 0.05 * i + 0.1, "precision": 0.2, "recall": 0.3}
            for i, m in enumerate(METHODS)]
    _stage_dir(runs, "prag_eval", "prag_eval", (), ["--output_dir", str(runs / "prag_eval")],
               results={"results": rows, "config": {}})
    (runs / "not_a_stage").mkdir()

    output = tmp_path / "report" / "report.md"
    run_stage("report", "--output", output, "--pipeline_dir", runs, runs / "not_a_stage")
    markdown = output.read_text()
    page = output.with_suffix(".html").read_text()

    # Every PNG the markdown links exists beside it, is a valid image, and is embedded in the HTML.
    images = re.findall(r"!\[([^\]]*)\]\(([^)]+)\)", markdown)
    assert images and len(images) == page.count("data:image/png;base64,")
    for _, link in images:
        path = output.parent / link
        assert path.read_bytes().startswith(PNG_SIGNATURE)
        with Image.open(path) as image:
            image.verify()
    plotted = {alt for alt, _ in images}
    # sft/rm losses and accuracy, ppo's reward (TRL's key) and losses only, every projector loss term.
    assert {"loss", "eval_loss", "eval_accuracy", "objective_scores", "loss_policy_avg", "lm_loss", "kl_loss",
            "mse_loss", "teacher_lm_loss"} <= plotted
    assert "val_clipfrac_avg" not in plotted and "learning_rate" not in plotted

    # The results table: all six methods, numbers in percent as in results.json.
    (table,) = _tables(markdown, "method")
    assert [row[0] for row in table] == list(METHODS)
    for row, source in zip(table, rows):
        assert int(row[1]) == source["questions"]
        assert [float(cell) for cell in row[2:]] == [round(100 * source[k], 2) for k in ("em", "f1", "precision",
                                                                                         "recall")]
    for method in METHODS:
        assert f"<td>{method}</td>" in page

    # rm accuracy and the metrics tables parse.
    assert re.search(r"accuracy[^\n]*: 0\.7500", markdown)
    sft_metrics, rm_metrics = ({name: float(value) for name, value in table} for table in _tables(markdown, "metric"))
    assert sft_metrics == {"train_loss": 0.5, "eval_loss": 0.7, "eval_perplexity": 2.01}
    assert rm_metrics == {"eval_accuracy": 0.75, "eval_margin": 1.5}

    # Commands: the recorded argv through the launch script, key flags added when a file gave them.
    commands = re.findall(r"```bash\n(.*)\n```", markdown)
    sft = next(shlex.split(c) for c in commands if "launch/sft.sh" in c)
    assert sft[:3] == ["bash", "launch/sft.sh", "examples/demo/sft.yaml"]
    assert sft[sft.index("--num_train_epochs") + 1] == "3"
    assert {"--output_dir", "--model_name_or_path", "--dataset"} <= set(sft)
    assert any(c.startswith("bash launch/projector.sh") and "--kl_weight 0.5" in c for c in commands)

    # Stages order follows the pipeline; absent stages and foreign folders are named in a note.
    headings = re.findall(r"^## (\w+):", markdown, flags=re.M)
    assert headings == ["sft", "rm", "ppo", "projector", "prag_eval"]
    assert re.search(r"Not in this report.*pt, augment, encode", markdown)
    assert "not_a_stage" in markdown


def test_report_user_errors(tmp_path):
    result = run_stage("report", "--output", tmp_path / "r.md", tmp_path / "missing", check=False)
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_run_config_records_argv(monkeypatch):
    from stages.common import resolved_config

    monkeypatch.setattr("sys.argv", ["launch/sft.sh", "--local_rank=1", "cfg.yaml", "--hub_token", "abc",
                                     "--output_dir", "out"])
    config = resolved_config("sft")
    assert config["argv"] == ["cfg.yaml", "--hub_token", "<redacted>", "--output_dir", "out"]
