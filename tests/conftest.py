"""Shared fixtures: a tiny Llama + tokenizer built locally, the demo data, and stage runners.

Nothing is downloaded: the tokenizer is trained on the project's own synthetic world and
the model is initialised from a config (stages.world.build). Real text comes from
../shared/data, and tests that need it skip with a reason where it is absent.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_configure(config) -> None:
    """Under pytest-xdist (`make test`: one worker per core), each worker and the stages it starts get
    an equal share of the cores: torch's default of one thread per core in every worker would
    oversubscribe the machine, and OpenMP threads that wait for a busy core spin."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(threads)


# The longest test files (seconds on one 2-core worker: ~290 each for the first two, then 170-245),
# collected first so that pytest-xdist (`--dist loadfile --no-loadscope-reorder`, as `make test`
# runs it) starts them first and the short files fill in around them at the end.
LONGEST_FIRST = ["test_real_model.py", "test_pipeline.py", "test_real_quality.py", "test_ppo.py", "test_distributed.py",
                 "test_reliability.py", "test_prag_eval.py", "test_projector.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: a file's tests keep their order


@pytest.fixture(scope="session")
def embedded_dir(tmp_path_factory) -> Path:
    """The embedded default (tiny preset): DIR/model and DIR/data."""
    out = tmp_path_factory.mktemp("embedded")
    subprocess.run([sys.executable, "-m", "stages.world.build", "--output_dir", str(out), "--preset", "tiny",
                    "--num_entities", "40"], check=True, cwd=ROOT, capture_output=True)
    return out


@pytest.fixture(scope="session")
def tiny_model(embedded_dir) -> Path:
    return embedded_dir / "model"


@pytest.fixture(scope="session")
def demo_data(embedded_dir) -> Path:
    return embedded_dir / "data"


@pytest.fixture(scope="session")
def pretrained_model() -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder, the way the main job gets it (stages.core.pretrained):
    the pip-shipped GGUF converted once per machine and cached, so every test of a run shares it."""
    from stages.core.pretrained import smollm2_folder

    return smollm2_folder()


@pytest.fixture(scope="session")
def real_data(tmp_path_factory) -> Path:
    """../shared/data/llamafactory_demo registered through a dataset_info.json of our own."""
    source = SHARED_DATA / "llamafactory_demo"
    if not source.is_dir():
        pytest.skip(f"real data folder {source} is absent")
    out = tmp_path_factory.mktemp("real_data")
    info = {
        "alpaca_en_demo": {"file_name": str(source / "alpaca_en_demo.json")},
        "identity": {"file_name": str(source / "identity.json")},
        "c4_demo": {"file_name": str(source / "c4_demo.jsonl"), "columns": {"prompt": "text"}},
        "dpo_en_demo": {"file_name": str(source / "dpo_en_demo.json"), "ranking": True, "formatting": "sharegpt",
                        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
    }
    (out / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return out


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
    from stages.world.build import build_datasets, generate_world, make_qa, say

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
