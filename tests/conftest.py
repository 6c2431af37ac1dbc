"""Shared fixtures: a tiny Llama + tokenizer built locally, the demo data, SmolLM2 and the real demo data.

Nothing is downloaded: the tokenizer is trained on the project's own synthetic world and
the model is initialised from a config (stages.world). Real text comes from
../shared/data, and tests that need it skip with a reason where it is absent.
The helpers the tests share (stage runners, paths) live in helpers.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, SHARED_DATA


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
    subprocess.run([sys.executable, "-m", "stages.world", "--output_dir", str(out), "--preset", "tiny",
                    "--num_entities", "40"], check=True, cwd=ROOT, capture_output=True)
    return out


@pytest.fixture(scope="session")
def tiny_model(embedded_dir) -> Path:
    return embedded_dir / "model"


@pytest.fixture(scope="session")
def demo_data(embedded_dir) -> Path:
    return embedded_dir / "data"


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    """The tiny model's tokenizer (test_real_model.py overrides it with SmolLM2's)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> Any:
    """The tiny model in fp32, frozen and in eval mode; one per test file, so a file's changes stay in it."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval().requires_grad_(False)


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
