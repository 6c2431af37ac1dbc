"""report: one markdown + HTML page about a set of stage output directories.

    python -m stages.report --output runs/demo/report.md runs/demo/pt runs/demo/sft ...
    python -m stages.report --output runs/demo/report.md --pipeline_dir runs/demo

For every stage folder (recognised by the "stage" of its run_config.json): the command that
reproduces it, its final metrics (all_results.json, *_summary.json; the rm accuracy among
them), its curves as PNG from trainer_log.jsonl (losses, the ppo reward, every projector loss
term) and, for prag_eval, the results table. Writes FILE.md with the PNGs in FILE_files/
(linked relatively) and FILE.html with the same content, images embedded (one portable file).
Stages without a folder are named in a closing note.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import shlex
from pathlib import Path
from typing import Any

from .errors import UserError, main_guard

# The pipeline's order; a stage of another name is reported after these.
STAGES = ("pt", "sft", "rm", "ppo", "augment", "encode", "projector", "prag_eval")
LAUNCHED = set(STAGES)  # the stages with a launch/<stage>.sh
# Logged numbers that are bookkeeping, not a curve worth a plot.
NOT_CURVES = ("step", "epoch", "learning_rate", "lr", "grad_norm", "episode", "eps", "passages", "total_flos")
# ppo logs some twenty statistics: the reward ("objective/scores", or "env/reward_mean" in older
# TRL), the KL and entropy, and the losses are the ones read.
PPO_PREFIXES = ("objective/", "env/", "loss/")
PPO_REWARD = ("objective/scores", "env/reward_mean")
# Always on the command line, even when a config file gives them: what a reader looks for first,
# and the DeepSpeed config the run used (which the launcher may have added from DS_CONFIG).
KEY_FLAGS = ("model_name_or_path", "dataset", "output_dir", "deepspeed")

Block = tuple  # ("h2"|"p"|"code"|"img"|"table", ...): the page before rendering


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def curve_keys(stage: str, records: list[dict[str, Any]]) -> tuple[str, ...]:
    """Every numeric key of the log that is a curve (first-seen order); ppo: reward, KL, losses."""
    keys: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if _number(value) and key not in NOT_CURVES and not key.endswith(("_per_second", "runtime")):
                keys.setdefault(key)
    if stage == "ppo":  # the reward curve first
        return tuple(sorted((k for k in keys if k.startswith(PPO_PREFIXES)), key=lambda k: k not in PPO_REWARD))
    return tuple(keys)


def final_metrics(folder: Path) -> dict[str, float]:
    """The run's final numbers: all_results.json (else train/eval/predict_results.json) and summaries."""
    files = [folder / "all_results.json"] if (folder / "all_results.json").is_file() else sorted(
        folder.glob("*_results.json"))
    metrics: dict[str, float] = {}
    for path in [*files, *sorted(folder.glob("*_summary.json"))]:
        values = _read_json(path)
        if isinstance(values, dict):
            metrics.update({k: v for k, v in values.items() if _number(v)})
    return metrics


def reproduce_command(stage: str, config: dict[str, Any]) -> str:
    """`bash launch/<stage>.sh <the run's argv>`, plus the KEY_FLAGS values the command line did not give.

    Runs recorded before run_config.json held `argv` get the KEY_FLAGS only.
    """
    argv = [str(a) for a in config.get("argv") or []]
    given = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    for key in KEY_FLAGS:
        if key not in given and config.get(key) not in (None, ""):
            argv += [f"--{key}", str(config[key])]
    program = f"bash launch/{stage}.sh" if stage in LAUNCHED else f"python -m stages.{stage}"
    return f"{program} {shlex.join(argv)}".strip()


def results_rows(folder: Path) -> list[dict[str, Any]]:
    results = _read_json(folder / "results.json")
    rows = results.get("results") if isinstance(results, dict) else None
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def stage_blocks(stage: str, folder: Path, config: dict[str, Any], assets: Path, link_base: Path) -> list[Block]:
    """The section of one stage: command, metrics, results table, curves."""
    from .callbacks import plot_loss, read_log

    blocks: list[Block] = [("h2", f"{stage}: {folder}"), ("p", "Reproduce:"),
                           ("code", reproduce_command(stage, config))]
    metrics = final_metrics(folder)
    if stage == "rm":
        accuracy = metrics.get("eval_accuracy")
        blocks.append(("p", f"Reward model accuracy (chosen scored above rejected, held-out pairs): "
                            f"{accuracy:.4f}" if accuracy is not None else "Reward model accuracy: not evaluated."))
    if metrics:
        blocks.append(("table", ["metric", "value"], [[k, _format(v)] for k, v in metrics.items()]))
    rows = results_rows(folder)
    if rows:
        from dyprag.metrics import SCORE_KEYS

        # In percent with two decimals, as prag_eval's own results.md.
        blocks.append(("p", "Results (EM, F1, precision, recall in percent):"))
        blocks.append(("table", ["method", "questions", "EM", "F1", "precision", "recall"],
                       [[str(r.get("method")), str(r.get("questions"))] +
                        [f"{100 * r[k]:.2f}" if _number(r.get(k)) else "" for k in SCORE_KEYS] for r in rows]))
    records = read_log(folder)
    keys = curve_keys(stage, records)
    if keys:
        assets.mkdir(parents=True, exist_ok=True)
        for path in plot_loss(folder, keys=keys, save_dir=assets):
            blocks.append(("img", path, path.relative_to(link_base).as_posix(), path.stem.removeprefix("training_")))
    elif not records:
        blocks.append(("p", "No trainer_log.jsonl: no curves."))
    return blocks


def render_markdown(title: str, blocks: list[Block]) -> str:
    lines = [f"# {title}", ""]
    for kind, *rest in blocks:
        if kind == "h2":
            lines += [f"## {rest[0]}", ""]
        elif kind == "p":
            lines += [rest[0], ""]
        elif kind == "code":
            lines += ["```bash", rest[0], "```", ""]
        elif kind == "img":
            lines += [f"![{rest[2]}]({rest[1]})", ""]
        elif kind == "table":
            header, rows = rest
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows] + [""]
    return "\n".join(lines)


def render_html(title: str, blocks: list[Block]) -> str:
    esc = html.escape
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{esc(title)}</title><style>"
             "body{font-family:sans-serif;max-width:60em;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}pre{background:#f4f4f4;padding:8px;"
             "white-space:pre-wrap}</style></head><body>", f"<h1>{esc(title)}</h1>"]
    for kind, *rest in blocks:
        if kind == "h2":
            parts.append(f"<h2>{esc(rest[0])}</h2>")
        elif kind == "p":
            parts.append(f"<p>{esc(rest[0])}</p>")
        elif kind == "code":
            parts.append(f"<pre><code>{esc(rest[0])}</code></pre>")
        elif kind == "img":  # embedded: the page stays whole when copied alone
            data = base64.b64encode(Path(rest[0]).read_bytes()).decode()
            parts.append(f"<img alt='{esc(rest[2])}' src='data:image/png;base64,{data}'>")
        elif kind == "table":
            header, rows = rest
            parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" + "".join(
                "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows) + "</table>")
    return "\n".join(parts + ["</body></html>\n"])


def find_stage_dirs(pipeline_dir: Path) -> list[Path]:
    if not pipeline_dir.is_dir():
        raise UserError(f"--pipeline_dir {pipeline_dir} is not a directory; give the pipeline's WORK_DIR.")
    return sorted(p.parent for p in pipeline_dir.glob("*/run_config.json"))


def build_report(folders: list[Path], output: Path) -> tuple[Path, Path]:
    """Write output (.md), its assets folder and the .html twin; returns (md, html)."""
    stages: list[tuple[str, Path, dict[str, Any]]] = []
    notes = []
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"stage directory {folder} does not exist; pass stage output_dir folders.")
        config = _read_json(folder / "run_config.json")
        if not isinstance(config, dict) or not config.get("stage"):
            notes.append(f"{folder}: no run_config.json with a stage, left out.")
            continue
        stages.append((config["stage"], folder, config))
    order = {name: i for i, name in enumerate(STAGES)}
    stages.sort(key=lambda s: order.get(s[0], len(STAGES)))  # stable: given order within a stage
    output.parent.mkdir(parents=True, exist_ok=True)
    assets = output.parent / f"{output.stem}_files"
    blocks: list[Block] = []
    used: set[str] = set()
    for stage, folder, config in stages:
        name, n = folder.name, 1
        while name in used:  # two runs of one folder name (e.g. a/sft, b/sft): their plots kept apart
            name, n = f"{folder.name}-{n}", n + 1
        used.add(name)
        blocks += stage_blocks(stage, folder, config, assets / name, output.parent)
    missing = [s for s in STAGES if s not in {stage for stage, _, _ in stages}]
    if missing:
        notes.append(f"Not in this report (no output directory given or found): {', '.join(missing)}.")
    if notes:
        blocks += [("h2", "Notes"), *(("p", note) for note in notes)]
    title = "Pipeline report"
    html_path = output.with_suffix(".html")
    output.write_text(render_markdown(title, blocks), encoding="utf-8")
    html_path.write_text(render_html(title, blocks), encoding="utf-8")
    return output, html_path


def run_report(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="*", type=Path, help="Stage output directories (each with run_config.json).")
    parser.add_argument("--pipeline_dir", type=Path, help="Report every stage folder directly under this folder.")
    parser.add_argument("--output", type=Path, required=True,
                        help="The markdown file to write; FILE.html and FILE_files/ (the PNGs) go beside it.")
    args = parser.parse_args(argv)
    folders = [*(find_stage_dirs(args.pipeline_dir) if args.pipeline_dir else []), *args.dirs]
    if not folders:
        raise UserError("no stage directories: pass output_dir folders or --pipeline_dir DIR.")
    if args.output.suffix != ".md":
        raise UserError(f"--output {args.output}: give a .md file name (the .html is written beside it).")
    md_path, html_path = build_report(folders, args.output)
    print(f"report: {md_path} and {html_path}", flush=True)


main = main_guard(run_report)

if __name__ == "__main__":
    main()
