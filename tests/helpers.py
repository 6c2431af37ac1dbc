"""Helpers the test files share: the repository's paths, stage runners (one process, or ranks through
launch/*.sh), their environment, the demo world's held-out records with an oracle augmentation, and a
prag_eval run's results recomputed from its predictions.

conftest.py holds the fixtures; tests import these by name (`from helpers import run_stage`): pytest's default
`prepend` import mode puts tests/ (no __init__.py) on sys.path.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


# A sitecustomize (test_reliability.pythonpath_with_hook) that lets DeepSpeed run fp16 on CPU ranks whose
# CPU has no fp16 kernels. DeepSpeed's CPU accelerator reports fp16 only where oneDNN has them (AVX512-FP16
# or AMX-FP16 CPUs) and the engine refuses fp16 otherwise; torch computes fp16 on any CPU, only slower. With
# it the fp16 paths of GPU runs (loss scaling, fp32 masters, their checkpoints) run here; nothing else
# changes: the accelerator class is patched when its module is first imported.
FP16_ON_CPU = """
import importlib.abc
import importlib.util
import sys


class CpuFp16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "deepspeed.accelerator.cpu_accelerator":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            module.CPU_Accelerator.is_fp16_supported = lambda self: True

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, CpuFp16())
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stage_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", **extra}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def oracle_records(seed: int = 0, num_entities: int = 40, gold_only: bool = True) -> list[dict]:
    """The held-out demo_qa records of world `seed` with an oracle augmentation of their gold (first) passage:
    a rewrite from the entity's facts and the world's questions about it (public PRAG format, `oracle_*`).
    `gold_only` keeps the gold passage alone in `passages`."""
    from stages.world import build_datasets, generate_world, make_qa, say

    world = generate_world(seed, num_entities)
    questions: dict[str, list] = {}
    for pair in make_qa(world):
        questions.setdefault(pair.entity_id, []).append(pair)
    records = [r for r in build_datasets(world)["demo_qa"] if r["split"] == "test"]
    for record in records:
        entity = world.by_id(record["entity_id"])
        if gold_only:
            record["passages"], record["passage_ids"] = record["passages"][:1], [entity.id]
        record["augment"] = [{
            "pid": 0, "passage": record["passages"][0],
            "oracle_rewrite": " ".join(say(entity, fact, 1) for fact in entity.facts),
            "oracle_qa": [{"question": p.question, "answer": p.answers[0], "full_answer": p.sentence}
                          for p in questions[entity.id]]}]
    return records


def rescored_results(out: Path) -> dict[str, tuple[int, float, float]]:
    """method -> (questions, EM, F1) of a prag_eval run in `out`, recomputed from its predictions.jsonl: every
    generation scored again against its gold answers (dyprag.scoring.evaluate), averaged per method, in percent."""
    from dyprag.scoring import evaluate

    with_cot = json.loads((out / "results.json").read_text())["config"]["with_cot"]
    scores: dict[str, list] = {}
    for line in (out / "predictions.jsonl").read_text().splitlines():
        prediction = json.loads(line)
        scores.setdefault(prediction["method"], []).append(evaluate(prediction["generation"], prediction["answer"],
                                                                    with_cot))
    return {method: (len(scored), 100 * sum(x.em for x in scored) / len(scored),
                     100 * sum(x.f1 for x in scored) / len(scored)) for method, scored in scores.items()}


def run_stage(stage: str, *args: str, check: bool = True, timeout: int = 600,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m stages.<stage> args...` in a fresh process (as a user runs it)."""
    result = subprocess.run([sys.executable, "-m", f"stages.{stage}", *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout, env=env or stage_env())
    if check and result.returncode != 0:
        raise AssertionError(f"stages.{stage} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def remove_shared_memory_left(port: int | str) -> list[str]:
    """Remove, and name, DeepSpeed's CPU allreduce buffers that a run on `port` left in /dev/shm.

    A finished run must leave none; a run that was killed on purpose may, and removing them
    keeps the suite from filling the machine's RAM.
    """
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    for path in left:
        path.unlink(missing_ok=True)
    return [path.name for path in left]


def launch(script: str, *args: str, nproc: int = 2, check: bool = True, timeout: int = 900,
           **env: str) -> subprocess.CompletedProcess:
    """`bash launch/<script>.sh args...` with NPROC_PER_NODE ranks on this machine."""
    port = free_port()
    run_env = stage_env(NPROC_PER_NODE=str(nproc), MASTER_PORT=str(port), OMP_NUM_THREADS="1", **env)
    result = subprocess.run(["bash", str(ROOT / "launch" / f"{script}.sh"), *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout, env=run_env)
    left = remove_shared_memory_left(port)
    if check and result.returncode != 0:
        raise AssertionError(f"launch/{script}.sh failed ({result.returncode}):\n{result.stdout[-6000:]}\n"
                             f"{result.stderr[-6000:]}")
    if result.returncode == 0:
        assert not left, f"launch/{script}.sh left DeepSpeed's shared memory behind: {left}"
    return result
