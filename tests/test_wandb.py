"""W&B offline: an sft run logs to a local run that reads back like trainer_log.jsonl, and keeps no key.

wandb (0.31) ships no Python reader for its `.wandb` files (its Go core writes them). The format is
LevelDB's log format behind a 7-byte W&B header, each record a `wandb_internal_pb2.Record`,
so the few lines below read it with wandb's own protobuf classes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

from helpers import run_stage, stage_env

FAKE_KEY = "local-0123456789abcdef0123456789abcdef01234567"  # 40+ chars, shaped like a real key
BLOCK = 32768  # LevelDB log block size
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4  # LevelDB log chunk types


def read_wandb_records(path: Path) -> Iterator:
    """Every record of a `.wandb` transaction log, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), "not a W&B transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a chunk header never straddles a block: the tail is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero-filled end of the last block
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_sft_logs_offline_to_wandb(tiny_model, demo_data, tmp_path):
    from stages.core.callbacks import read_log

    out, wandb_dir = tmp_path / "sft", tmp_path / "wandb_dir"
    wandb_dir.mkdir()
    env = stage_env(WANDB_MODE="offline", WANDB_DIR=str(wandb_dir), WANDB_API_KEY=FAKE_KEY,
                    WANDB_PROJECT="stages-test")
    result = run_stage("sft", "--model_name_or_path", tiny_model, "--dataset", "demo_sft", "--dataset_dir", demo_data,
                       "--max_samples", "16", "--cutoff_len", "96", "--output_dir", out, "--do_train",
                       "--max_steps", "4", "--per_device_train_batch_size", "4", "--logging_steps", "1",
                       "--report_to", "wandb", "--wandb_group", "pipeline-42", "--wandb_job_type", "sft-stage",
                       env=env)

    runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    logs = list(runs[0].glob("*.wandb"))
    assert len(logs) == 1
    records = list(read_wandb_records(logs[0]))

    # Naming: the pipeline's group and our job type.
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.run_group, run.job_type) == ("stages-test", "pipeline-42", "sft-stage")

    # The resolved config (run_config.json) is the run's config, value for value.
    config = {item.key: json.loads(item.value_json) for item in run.config.update if item.key != "_wandb"}
    assert config == json.loads((out / "run_config.json").read_text())

    # The loss per step logged to W&B is the loss per step in trainer_log.jsonl.
    history = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.append(row)
    wandb_losses = {row["train/global_step"]: row["train/loss"] for row in history if "train/loss" in row}
    jsonl_losses = {r["step"]: r["loss"] for r in read_log(out) if "loss" in r}
    assert len(jsonl_losses) == 4
    assert wandb_losses == jsonl_losses

    # No key anywhere: not in the run's files, W&B's own files, or what the run printed.
    assert FAKE_KEY not in result.stdout and FAKE_KEY not in result.stderr
    for folder in (out, wandb_dir):
        for path in folder.rglob("*"):
            if path.is_file():
                assert FAKE_KEY.encode() not in path.read_bytes(), path
