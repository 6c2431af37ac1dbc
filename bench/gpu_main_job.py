"""The main job on one GPU: every stage of launch/pipeline.sh on the real model, bf16, the accelerator's defaults.

    python bench/gpu_main_job.py [--work_dir runs/gpu] [--stages "pt sft ..."]

Each stage runs alone through the pipeline (`STAGES=<stage> bash launch/pipeline.sh`, one rank,
BF16=true), so its wall time, its tokens/s and the GPU's peak memory (nvidia-smi, sampled every
0.2 s: what every process of the stage held together) are its own. Tokens/s is what the stage
itself reports: the HF stages' `num_input_tokens_seen` over `train_runtime` (pt, sft, rm), and
the trained tokens over the seconds of encode's summary; a stage that counts none prints "-". The whole job is
meant to finish in under 8 minutes; the script prints the total.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = "pt sft rm ppo export augment encode projector prag_eval encode_real prag_eval_real report"


class PeakMemory:
    """The largest memory.used (MiB) nvidia-smi reports for GPU 0 while the `with` block runs."""

    def __enter__(self) -> PeakMemory:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i",
                                  "0"], capture_output=True, text=True).stdout.strip()
            if out.isdigit():
                self.peak = max(self.peak, int(out))
            self._stop.wait(0.2)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def tokens_per_second(stage_dir: Path) -> float | None:
    """What the stage reports of its own throughput, if anything."""
    log = stage_dir / "trainer_log.jsonl"
    results = stage_dir / "all_results.json"
    if log.is_file() and results.is_file():
        seen = [json.loads(line).get("num_input_tokens_seen") for line in log.read_text().splitlines() if line]
        seen = [value for value in seen if value]
        runtime = json.loads(results.read_text()).get("train_runtime")
        if seen and runtime:
            return seen[-1] / runtime
    summary = stage_dir / "encode_summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        if data.get("tokens") and data.get("seconds"):
            return data["tokens"] / data["seconds"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", default="runs/gpu", help="the pipeline's WORK_DIR (replaced)")
    parser.add_argument("--stages", default=STAGES, help="the stages to run, in order")
    args = parser.parse_args()
    if shutil.which("nvidia-smi") is None:
        print("error: no nvidia-smi on this machine; this benchmark needs one NVIDIA GPU.", file=sys.stderr)
        sys.exit(2)
    work = ROOT / args.work_dir
    shutil.rmtree(work, ignore_errors=True)
    env = {**os.environ, "WORK_DIR": args.work_dir, "NPROC_PER_NODE": "1", "BF16": "true",
           "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    rows, start = [], time.time()
    for stage in args.stages.split():
        t0 = time.time()
        with PeakMemory() as memory:
            done = subprocess.run(["bash", "launch/pipeline.sh"], cwd=ROOT, env={**env, "STAGES": stage},
                                  capture_output=True, text=True)
        seconds = time.time() - t0
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", file=sys.stderr)
            sys.exit(f"stage {stage} failed ({done.returncode})")
        rate = tokens_per_second(work / ("sft_merged" if stage == "export" else stage))
        rows.append((stage, seconds, rate, memory.peak))
        print(f"{stage:>15}: {seconds:7.1f} s  {'-' if rate is None else f'{rate:,.0f}':>9} tokens/s  "
              f"peak {memory.peak:,} MiB", flush=True)
    print(f"main job on one GPU: {time.time() - start:.0f} s in all (goal: under 480 s)")


if __name__ == "__main__":
    main()
