"""The main job (launch/pipeline.sh) on a reduced setting: every stage's outputs and the report.

The pipeline is killed once in the middle (after pt finished, while sft runs) and started
again: the second run must skip pt, finish the rest, and leave every stage's outputs, a
report whose results table has all six methods, and valid PNG plots.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import ROOT, free_port, remove_shared_memory_left, rescored_results, stage_env

pytestmark = pytest.mark.slow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METHODS = ["vanilla", "rag", "prag", "prag_combine", "dyprag", "dyprag_combine"]


def _pipeline(work: Path, log: Path, port: int) -> subprocess.Popen:
    # BF16=true: every stage's bf16 path runs here (the demo picks fp32 on CPUs that emulate bf16).
    env = stage_env(WORK_DIR=str(work), PRESET="tiny", DEMO_SCALE="reduced", NPROC_PER_NODE="2", BF16="true",
                    OMP_NUM_THREADS="1", MASTER_PORT=str(port), WANDB_DIR=str(work))
    return subprocess.Popen(["bash", str(ROOT / "launch" / "pipeline.sh")], cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def test_pipeline_runs_every_stage_resumes_after_a_kill_and_reports(tmp_path):
    work = tmp_path / "demo"
    port = free_port()
    first = _pipeline(work, tmp_path / "first.log", port)
    deadline = time.time() + 600
    while not (work / "pt" / ".pipeline_complete").is_file() or not (work / "sft").is_dir():
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
        assert time.time() < deadline, "pt did not finish in time"
        time.sleep(1)
    os.killpg(first.pid, signal.SIGKILL)  # the whole job: the launcher and its ranks
    first.wait()
    remove_shared_memory_left(port)
    assert not (work / "sft" / ".pipeline_complete").exists()

    second = _pipeline(work, tmp_path / "second.log", port)
    assert second.wait(timeout=1500) == 0, (tmp_path / "second.log").read_text()[-6000:]
    assert not remove_shared_memory_left(port), "a stage left DeepSpeed's shared memory behind"
    log = (tmp_path / "second.log").read_text()
    assert "== pt: already complete" in log and "== sft: restarting the stopped run" in log
    assert "== main job done in" in log

    # Every stage left its outputs.
    for stage in ("pt", "sft", "rm", "ppo"):
        assert (work / stage / "trainer_log.jsonl").is_file(), stage
    assert (work / "sft" / "adapter_model.safetensors").is_file()
    rm_metrics = json.loads((work / "rm" / "all_results.json").read_text())
    # rm's accuracy is a count of its held-out pairs (val_size 0.1 of demo_pref) over their number, on 2 ranks too.
    held_out = math.ceil(0.1 * len(json.loads((work / "embedded" / "data" / "demo_pref.json").read_text())))
    assert rm_metrics["eval_accuracy"] * held_out == pytest.approx(round(rm_metrics["eval_accuracy"] * held_out))
    assert (work / "sft_merged" / "config.json").is_file()
    summary = json.loads((work / "augment" / "augment_summary.json").read_text())
    assert summary["passages"] == summary["augmented"] + summary["skipped_qa"] + summary["skipped_rewrite"]
    assert json.loads((work / "encode" / "encode_summary.json").read_text())["passages"] > 0
    results = json.loads((work / "prag_eval" / "results.json").read_text())["results"]
    assert [row["method"] for row in results] == METHODS
    rescored = rescored_results(work / "prag_eval")  # each answer scored again from predictions.jsonl
    assert all((row["questions"], row["em"], row["f1"]) == pytest.approx(rescored[row["method"]]) for row in results)

    # The report: markdown + HTML, the six-row table, valid PNGs it links to.
    report = (work / "report.md").read_text()
    assert (work / "report.html").is_file()
    assert all(f"| {method} " in report for method in METHODS), report
    images = [work / line.split("](")[1].split(")")[0] for line in report.splitlines() if "![" in line]
    assert images and all(p.read_bytes().startswith(PNG_SIGNATURE) for p in images)
    assert "bash launch/sft.sh" in report
    parsed = summary["augmented"], summary["passages"]
    assert f"Augmentation parsed (a rewrite and the QA list) for {parsed[0]} of {parsed[1]} distinct passages" in report
