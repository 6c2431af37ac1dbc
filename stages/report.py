"""report: one markdown + HTML page about a set of stage output directories.

    python -m stages.report --output runs/demo/report.md runs/demo/pt runs/demo/sft ...
    python -m stages.report --output runs/demo/report.md --pipeline_dir runs/demo

For every stage folder (recognised by the "stage" of its run_config.json): the command that
reproduces it (paths under the repository relative to its root, where the command runs), its
final metrics (all_results.json, *_summary.json; the rm accuracy among them) and one figure of
its curves from trainer_log.jsonl, the series that belong together on one chart (train and eval
loss; the projector's LM, KL and MSE terms; ppo's reward, KL, entropy and losses side by side).
Every prag_eval* folder is a question set: its results table beside a grouped bar chart (methods
x EM/F1) and a few sample answers per method from its predictions.jsonl. Writes FILE.md with the
PNGs in FILE_files/ (linked relatively) and FILE.html with the same content, images embedded (one
portable file). Stages without a folder are named in a closing note.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .core.errors import UserError, main_guard
from .core.launching import ROOT

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# The pipeline's order; a stage of another name is reported after these.
STAGES = ("pt", "sft", "rm", "ppo", "augment", "encode", "projector", "prag_eval")
LAUNCHED = set(STAGES)  # the stages with a launch/<stage>.sh
LOGGED = ("pt", "sft", "rm", "ppo", "encode", "projector")  # the stages that write trainer_log.jsonl
# Numbers the HF Trainer logs that are bookkeeping, not a curve worth a plot; so are *_runtime,
# *_per_second and its end-of-run train_* summary (one record, already in the metrics table).
NOT_CURVES = ("step", "epoch", "learning_rate", "grad_norm", "total_flos", "skipped_batches")
# The charts of the stages whose log is not the HF Trainer's: (title, keys drawn together, log y).
# ppo logs some twenty statistics; its reward, KL to the reference, entropy and two losses are read, each
# on its own chart (their scales differ by orders of magnitude). encode logs one line per batch of
# passages, each of which trained its own LoRA. The projector's loss terms share one log-scaled chart:
# MSE is ~1e-2 where LM is ~7, and the student's LM loss is read against the teacher's.
PANELS: dict[str, tuple[tuple[str, tuple[str, ...], bool], ...]] = {
    "ppo": (("reward (reward model score)", ("objective/scores",), False),
            ("KL to the reference", ("objective/kl",), False), ("entropy", ("objective/entropy",), False),
            ("losses", ("loss/policy_avg", "loss/value_avg"), False)),
    "encode": (("passage LoRA loss, mean of a batch: first and last epoch", ("first_epoch_loss", "loss"), False),),
    "projector": (("LM, KL and MSE terms", ("lm_loss", "teacher_lm_loss", "kl_loss", "mse_loss"), True),
                  ("loss = LM + kl_weight KL + mse_weight MSE", ("loss",), False)),
}
SPARSE = 20  # a series of this many points or fewer is drawn with a marker on each (one point is visible)
SAMPLES = 3  # questions shown with every method's answer
ANSWER_CHARS = 60  # an answer cut to this length: a model that rambles still leaves a readable table
# Always on the command line, even when a config file gives them: what a reader looks for first,
# and the DeepSpeed config the run used (which the launcher may have added from DS_CONFIG).
KEY_FLAGS = ("model_name_or_path", "dataset", "output_dir", "deepspeed")

Block = tuple  # ("h2"|"p"|"code"|"img"|"table"|"side", ...): the page before rendering
Series = tuple[list[float], list[float]]  # steps, values
Panel = tuple[str, dict[str, Series], bool]  # title, label -> series, log-scaled y


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _series(records: list[dict[str, Any]], key: str) -> Series | None:
    points = [(r["step"], r[key]) for r in records if _number(r.get(key)) and _number(r.get("step"))]
    return ([s for s, _ in points], [v for _, v in points]) if points else None


def _panel(title: str, records: list[dict[str, Any]], keys: tuple[str, ...], log: bool) -> Panel | None:
    series = {key: points for key in keys if (points := _series(records, key))}
    # A log axis only holds positive numbers (a KL estimate can dip below zero).
    positive = all(v > 0 for _, values in series.values() for v in values)
    return (title, series, log and positive) if series else None


def curve_panels(stage: str, records: list[dict[str, Any]]) -> list[Panel]:
    """The charts of a stage's figure, none empty: PANELS, else one per metric with its eval_ twin, loss first.

    A run whose log has no per-step "loss" (fewer steps than logging_steps) shows the trainer's
    train_loss, the mean over the run, beside its eval loss instead.
    """
    if stage in PANELS:
        return [p for title, keys, log in PANELS[stage] if (p := _panel(title, records, keys, log))]
    names: dict[str, None] = {"loss": None}
    for record in records:
        for key, value in record.items():
            if _number(value) and key not in NOT_CURVES and not key.startswith("train_") and not key.endswith(
                    ("_per_second", "runtime")):
                names.setdefault(key.removeprefix("eval_"))
    train_loss = () if _series(records, "loss") else ("train_loss",)
    groups = [(name, (name, f"eval_{name}", *(train_loss if name == "loss" else ()))) for name in names]
    return [p for name, keys in groups if (p := _panel(name, records, keys, False))]


def curves_figure(title: str, panels: list[Panel]) -> Figure | None:
    """One figure of `panels` (two per row); None without any. Sparse series are marked point by point."""
    if not panels:
        return None
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from .core.callbacks import _smooth

    cols = min(len(panels), 2)
    rows = math.ceil(len(panels) / cols)
    figure = Figure(figsize=(6.5 * cols, 3.4 * rows), layout="constrained")
    figure.suptitle(title)
    for index, (name, series, log) in enumerate(panels, 1):
        ax = figure.add_subplot(rows, cols, index)
        for color, (label, (steps, values)) in enumerate(series.items()):
            sparse = len(values) <= SPARSE
            # Dense: the raw curve faint under its smoothed one (the weight of the stages' own plots).
            ax.plot(steps, values, color=f"C{color}", label=label, marker="o" if sparse else None, markersize=4,
                    alpha=1.0 if sparse else 0.35)
            if not sparse:
                ax.plot(steps, _smooth(values, 1.8 / (1 + math.exp(-0.05 * len(values))) - 1), color=f"C{color}",
                        label="_smoothed")
        if log:
            ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps: no tick at 2.5
        first, last = min(min(x) for x, _ in series.values()), max(max(x) for x, _ in series.values())
        if last - first < 2:  # one step (an eval at the end): whole steps around it, not 5.68 ... 6.32
            ax.set_xlim(first - 1, last + 1)
        ax.grid(alpha=0.3)
        # Beside the chart, never over it: a legend inside hides the points it falls on.
        for handle in ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0).legend_handles:
            handle.set_alpha(1.0)
    return figure


def results_figure(title: str, rows: list[dict[str, Any]]) -> Figure | None:
    """Grouped bars, EM and F1 in percent per method, each bar labelled with its value; None without scores."""
    rows = [r for r in rows if _number(r.get("em")) and _number(r.get("f1"))]
    if not rows:
        return None
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1.8 + 0.8 * len(rows), 3.4), layout="constrained")
    ax = figure.add_subplot()
    width = 0.4
    for offset, key in ((-width / 2, "em"), (width / 2, "f1")):
        bars = ax.bar([i + offset for i in range(len(rows))], [r[key] for r in rows], width, label=key.upper())
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(rows)), [str(r.get("method")) for r in rows], rotation=25, ha="right", fontsize=8)
    # Zero scores still leave the labels on the chart, and a line that says so; headroom keeps them inside it.
    top = max(r[k] for r in rows for k in ("em", "f1"))
    if top == 0:
        ax.text(0.5, 0.5, "every EM and F1 is 0", transform=ax.transAxes, ha="center", color="0.4")
    ax.set_ylim(0, 1.15 * max(10.0, top))
    ax.set_ylabel("%")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)  # off the bars
    return figure


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


def repo_relative(arg: str) -> str:
    """`arg` (a path, `--key=path` or comma-separated paths) with absolute paths under the repository made
    relative to its root, where the printed commands run; any other argument as it is."""
    key, sep, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)

    def relative(path: str) -> str:
        if not os.path.isabs(path):
            return path
        for candidate in (Path(os.path.normpath(path)), Path(os.path.realpath(path))):  # as typed, or via a link
            if candidate.is_relative_to(ROOT):
                return candidate.relative_to(ROOT).as_posix()
        return path

    return key + sep + ",".join(relative(part) for part in value.split(","))


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
    return f"{program} {shlex.join(repo_relative(a) for a in argv)}".strip()


def results_rows(folder: Path) -> list[dict[str, Any]]:
    results = _read_json(folder / "results.json")
    rows = results.get("results") if isinstance(results, dict) else None
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def sample_answers(folder: Path, limit: int = SAMPLES) -> tuple[list[str], list[list[str]]]:
    """From prag_eval's predictions.jsonl: the first `limit` questions, their gold answers and every method's
    extracted answer, as (header, rows); no rows without the file."""
    path = folder / "predictions.jsonl"
    methods: dict[str, None] = {}
    questions: dict[Any, dict[str, Any]] = {}  # test_id -> question, gold aliases, answer per method
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            prediction = json.loads(line)
        except ValueError:  # a line cut short: the others still read
            continue
        if not isinstance(prediction, dict) or "method" not in prediction:
            continue
        method = str(prediction["method"])
        methods.setdefault(method)
        gold = prediction.get("answer") or []  # the record's gold aliases
        question = questions.setdefault(prediction.get("test_id"), {
            "question": str(prediction.get("question", "")), "answers": {},
            "gold": " / ".join(map(str, gold if isinstance(gold, list) else [gold]))})
        answer = str(prediction.get("prediction", ""))
        question["answers"][method] = answer if len(answer) <= ANSWER_CHARS else answer[:ANSWER_CHARS - 1] + "…"
    rows = [[q["question"], q["gold"], *(q["answers"].get(m, "") for m in methods)]
            for q in list(questions.values())[:limit]]
    return ["question", "gold", *methods], rows


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def stage_figures(stage: str, folder: Path) -> dict[str, Figure]:
    """The figures of one stage folder by name ("curves", "results"), each holding data; empty ones left out."""
    from .core.callbacks import read_log

    figures = {"curves": curves_figure(f"{stage}: {repo_relative(str(folder))}", curve_panels(stage, read_log(folder))),
               "results": results_figure(f"{folder.name}: EM and F1 per method", results_rows(folder))}
    return {name: figure for name, figure in figures.items() if figure is not None}


def _save(figure: Figure, path: Path, link_base: Path, alt: str) -> Block:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return ("img", path, path.relative_to(link_base).as_posix(), alt)


def question_set(config: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The line that names a prag_eval folder's questions: file, split, how many were answered."""
    counts = sorted({r.get("questions") for r in rows if _number(r.get("questions"))})
    where = repo_relative(str(config.get("data_file") or "(data file not recorded)"))
    split = f", split {config['split']}" if config.get("split") else ""
    return f"Question set: {where}{split}; {' / '.join(map(str, counts)) or 'no'} questions per method."


def stage_blocks(stage: str, folder: Path, config: dict[str, Any], assets: Path, link_base: Path) -> list[Block]:
    """The section of one stage: command, metrics, results table and chart, sample answers, curves."""
    blocks: list[Block] = [("h2", f"{stage}: {repo_relative(str(folder))}"), ("p", "Reproduce:"),
                           ("code", reproduce_command(stage, config))]
    figures = stage_figures(stage, folder)
    metrics = final_metrics(folder)
    if stage == "rm":
        accuracy = metrics.get("eval_accuracy")
        blocks.append(("p", f"Reward model accuracy (chosen scored above rejected, held-out pairs): "
                            f"{accuracy:.4f}" if accuracy is not None else "Reward model accuracy: not evaluated."))
    if stage == "augment" and metrics.get("passages"):
        blocks.append(("p", f"Augmentation parsed (a rewrite and the QA list) for {metrics.get('augmented', 0):.0f} of "
                            f"{metrics['passages']:.0f} distinct passages "
                            f"({100 * metrics.get('augmented', 0) / metrics['passages']:.1f} %)."))
    if metrics:
        blocks.append(("table", ["metric", "value"], [[k, _format(v)] for k, v in metrics.items()]))
    rows = results_rows(folder)
    if rows:
        from dyprag.scoring import SCORE_KEYS

        # results.json holds percentages; two decimals, as prag_eval's own results.md.
        blocks += [("p", question_set(config, rows)), ("p", "Results (EM, F1, precision, recall in percent):")]
        table = ("table", ["method", "questions", "EM", "F1", "precision", "recall"],
                 [[str(r.get("method")), str(r.get("questions"))] +
                  [f"{r[k]:.2f}" if _number(r.get(k)) else "" for k in SCORE_KEYS] for r in rows])
        chart = figures.get("results")
        blocks.append(("side", [table, _save(chart, assets / "results.png", link_base, f"{folder.name} results")])
                      if chart else table)
        header, samples = sample_answers(folder)
        if samples:
            blocks += [("p", f"Sample answers (the first {len(samples)} questions; each method's extracted answer):"),
                       ("table", header, samples)]
    if "curves" in figures:
        blocks.append(_save(figures["curves"], assets / "curves.png", link_base, f"{folder.name} curves"))
    elif stage in LOGGED:
        blocks.append(("p", "No curves: trainer_log.jsonl is missing or holds no metric."))
    return blocks


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown_lines(blocks: list[Block]) -> list[str]:
    lines: list[str] = []
    for kind, *rest in blocks:
        if kind == "side":  # one after the other: markdown has no columns
            lines += _markdown_lines(rest[0])
        elif kind == "h2":
            lines += [f"## {rest[0]}", ""]
        elif kind == "p":
            lines += [rest[0], ""]
        elif kind == "code":
            lines += ["```bash", rest[0], "```", ""]
        elif kind == "img":
            lines += [f"![{rest[2]}]({rest[1]})", ""]
        elif kind == "table":
            header, rows = rest
            lines += ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in rows] + [""]
    return lines


def render_markdown(title: str, blocks: list[Block]) -> str:
    return "\n".join([f"# {title}", "", *_markdown_lines(blocks)])


def _numeric(cell: str) -> bool:  # right-aligned in the HTML tables; text (names, answers) reads from the left
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _html_blocks(blocks: list[Block]) -> list[str]:
    esc = html.escape
    parts = []
    for kind, *rest in blocks:
        if kind == "side":  # the results table beside its chart, wrapping on a narrow window
            parts.append("<div class='side'>" + "".join(_html_blocks(rest[0])) + "</div>")
        elif kind == "h2":
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
                "<tr>" + "".join(f"<td class='n'>{esc(c)}</td>" if _numeric(c) else f"<td>{esc(c)}</td>" for c in row)
                + "</tr>" for row in rows) + "</table>")
    return parts


def render_html(title: str, blocks: list[Block]) -> str:
    esc = html.escape
    head = (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{esc(title)}</title><style>"
            "body{font-family:sans-serif;max-width:75em;margin:auto;padding:0 1em}table{border-collapse:collapse}"
            "td{overflow-wrap:anywhere}"  # a rambling answer without spaces wraps instead of widening the page
            "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}td.n{text-align:right}img{max-width:100%}"
            ".side{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start}"
            "pre{background:#f4f4f4;padding:8px;white-space:pre-wrap}</style></head><body>")
    return "\n".join([head, f"<h1>{esc(title)}</h1>", *_html_blocks(blocks), "</body></html>\n"])


def find_stage_dirs(pipeline_dir: Path) -> list[Path]:
    """The stage folders directly under `pipeline_dir`: each with a run_config.json, and every prag_eval*
    folder with a results.json (one question set each, e.g. prag_eval and prag_eval_real)."""
    if not pipeline_dir.is_dir():
        raise UserError(f"--pipeline_dir {pipeline_dir} is not a directory; give the pipeline's WORK_DIR.")
    return sorted({p.parent for p in pipeline_dir.glob("*/run_config.json")} |
                  {p.parent for p in pipeline_dir.glob("prag_eval*/results.json")})


def stage_config(folder: Path) -> dict[str, Any] | None:
    """run_config.json, else the run config prag_eval also keeps in results.json; None without a stage."""
    config = _read_json(folder / "run_config.json")
    if not isinstance(config, dict):
        results = _read_json(folder / "results.json")
        config = results.get("config") if isinstance(results, dict) else None
    return config if isinstance(config, dict) and config.get("stage") else None


def build_report(folders: list[Path], output: Path) -> tuple[Path, Path]:
    """Write output (.md), its assets folder and the .html twin; returns (md, html)."""
    stages: list[tuple[str, Path, dict[str, Any]]] = []
    notes = []
    for folder in folders:
        if not folder.is_dir():
            raise UserError(f"stage directory {folder} does not exist; pass stage output_dir folders.")
        config = stage_config(folder)
        if config is None:
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
    parser.add_argument("--pipeline_dir", type=Path,
                        help="Report every stage folder directly under this folder (every prag_eval* among them).")
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
