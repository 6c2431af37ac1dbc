"""launch/slurm/stage.sbatch under a real Slurm: sft with two ranks on one node, submitted with sbatch.

Runs where Slurm is installed and its node takes jobs, or with STAGES_TEST_SLURM=1 (as root:
tests/slurm/setup_slurm.sh installs Slurm from the Debian packages and starts a single-node
controller and daemon). `make test-slurm` does the latter.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess

import pytest
from helpers import ROOT, free_port, run_stage, stage_env

pytestmark = pytest.mark.slurm

SETUP = ROOT / "tests" / "slurm" / "setup_slurm.sh"


def _slurm_takes_jobs() -> bool:
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return False
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20).stdout
    except subprocess.TimeoutExpired:
        return False
    return any(state.rstrip("*") in ("idle", "mixed") for state in states.split())


@pytest.fixture(scope="module")
def slurm() -> None:
    if _slurm_takes_jobs():
        return
    if os.environ.get("STAGES_TEST_SLURM") != "1":
        pytest.skip("no Slurm node takes jobs here; `make test-slurm` (root) installs and starts one")
    subprocess.run(["bash", str(SETUP)], check=True, timeout=900)
    assert _slurm_takes_jobs()


def test_sft_job_two_ranks(slurm, tiny_model, demo_data, tmp_path):
    out, log = tmp_path / "sft", tmp_path / "job.out"
    args = ["--model_name_or_path", str(tiny_model), "--dataset", "demo_sft", "--dataset_dir", str(demo_data),
            "--max_samples", "16", "--cutoff_len", "64", "--output_dir", str(out), "--do_train", "--max_steps", "3",
            "--per_device_train_batch_size", "2", "--logging_steps", "1", "--report_to", "none"]
    env = stage_env(NPROC_PER_NODE="2", OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()),
                    HOSTFILE_DIR=str(tmp_path))
    # --wait: sbatch returns when the job ends, with the job's exit status.
    command = ["sbatch", "--wait", "--parsable", "--job-name", "test-sft", "--output", str(log), "--time", "15",
               "launch/slurm/stage.sbatch", "sft", *args]
    try:
        job = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--name", "test-sft"], check=False)
        raise
    output = log.read_text() if log.is_file() else ""
    assert job.returncode == 0, f"{job.stderr}\n{output[-6000:]}"
    job_id = job.stdout.strip().split(";")[0]

    # The hostfile of the allocation and two ranks on its one node, started by the DeepSpeed launcher.
    assert (tmp_path / f"hostfile-{job_id}").read_text().split() == [socket.gethostname(), "slots=2"]
    assert "dist_world_size=2" in output and "node_rank=0" in output

    # The stage's outputs: a finite loss per step, the adapter, the metrics, the command recorded.
    losses = [json.loads(line)["loss"] for line in (out / "trainer_log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert (out / "adapter_model.safetensors").is_file()
    assert math.isfinite(json.loads((out / "all_results.json").read_text())["train_loss"])
    assert json.loads((out / "run_config.json").read_text())["argv"] == args

    # The report of this run names the command that reproduces it on one machine.
    run_stage("report", "--output", tmp_path / "report.md", out)
    assert f"bash launch/sft.sh --model_name_or_path {tiny_model}" in (tmp_path / "report.md").read_text()
