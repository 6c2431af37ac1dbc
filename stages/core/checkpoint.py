"""Checkpoints of every training stage: written aside and renamed whole, safetensors + JSON only.

`staged_checkpoint` is the one way a stage writes `output_dir/checkpoint-N`; the rest reads and writes
what a checkpoint holds besides the weights (optimizer state, random generators) and checks a folder
before a resume loads it. Heavy imports stay inside the functions: `stages.core.stage` imports this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

STAGING_DIR = ".saving"  # under output_dir: checkpoints being written (never a resume candidate)
OPTIMIZER = "optimizer"  # the default stem of optimizer_state_to_files: optimizer.safetensors + optimizer.json


@dataclass
class StagedCheckpoint:
    """A checkpoint being written: into `folder` (under output_dir/.saving/), renamed to `final` once whole."""

    folder: Path
    final: Path
    keep: str | None = None  # a checkpoint the rotation keeps besides the newest (Trainer's best model)


@contextlib.contextmanager
def staged_checkpoint(output_dir: Path, name: str, *, main: bool, barrier: Callable[[], None],
                      save_total_limit: int | None) -> Iterator[StagedCheckpoint]:
    """Every rank writes its files of checkpoint `name` into the yielded `folder`; then the main process renames
    it to output_dir/name in one step and deletes older checkpoints down to `save_total_limit`.

    Every rank enters, and leaves after the rename. A crash while writing leaves a half checkpoint under
    .saving/ only: the previous checkpoint stays the newest, which `--resume_from_checkpoint last` takes.
    A checkpoint of the same step from before a resume is replaced whole. The rotation orders by mtime
    (transformers falls back to step numbers where mtimes are too close): after a resume from an earlier
    checkpoint the one just written is the newest, and the checkpoints past it go first.
    """
    from transformers.trainer_utils import rotate_checkpoints

    staged = StagedCheckpoint(output_dir / STAGING_DIR / name, output_dir / name)
    if main:
        shutil.rmtree(staged.folder, ignore_errors=True)  # the leftover of a save that crashed
    barrier()
    yield staged  # an exception leaves the folder where it is: nothing is renamed
    barrier()  # every rank's files are in the folder
    if main:
        if staged.final.is_dir():
            shutil.rmtree(staged.final)
        os.replace(staged.folder, staged.final)
        rotate_checkpoints(str(output_dir), save_total_limit, staged.keep, use_mtime=True)
        with contextlib.suppress(OSError):  # empty now, unless another save is under way
            os.rmdir(staged.folder.parent)
    barrier()


def save_whole_tensors(tensors: dict[str, Any], path: Path) -> None:
    """Gathered whole tensors (fp32 master weights, optimizer moments) as one fp32 safetensors file."""
    from safetensors.torch import save_file

    save_file({key: value.detach().float().contiguous().cpu() for key, value in tensors.items()}, str(path))


def optimizer_state_to_files(state_dict: dict[str, Any], folder: Path, stem: str = OPTIMIZER) -> None:
    """A torch optimizer's state_dict as tensors (STEM.safetensors) + the rest (STEM.json).

    A tensor is named by its parameter index and key path, "<index>.<key>", or "<index>.<key>/<subkey>"
    in the dicts some optimizers nest (bitsandbytes keeps its 8-bit state and block scales in one).
    """
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def split(values: dict[str, Any], name: str) -> dict[str, Any]:
        # The non-tensor part of `values` (nested dicts kept), its tensors put into `tensors`.
        rest = {}
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{name}{key}"] = value.detach().contiguous().cpu()
            elif isinstance(value, dict):
                rest[key] = split(value, f"{name}{key}/")
            else:
                rest[key] = value
        return rest

    scalars = {str(index): split(values, f"{index}.") for index, values in state_dict["state"].items()}
    save_file(tensors, str(folder / f"{stem}.safetensors"))
    (folder / f"{stem}.json").write_text(json.dumps({"state": scalars, "param_groups": state_dict["param_groups"]}),
                                         encoding="utf-8")


def optimizer_state_from_files(folder: Path, stem: str = OPTIMIZER) -> dict[str, Any]:
    """The state_dict `optimizer_state_to_files` wrote."""
    from safetensors.torch import load_file

    saved = json.loads((folder / f"{stem}.json").read_text(encoding="utf-8"))
    state: dict[int, dict[str, Any]] = {int(index): values for index, values in saved["state"].items()}
    for name, tensor in load_file(str(folder / f"{stem}.safetensors")).items():
        index, path = name.split(".", 1)
        *parents, key = path.split("/")
        values = state.setdefault(int(index), {})
        for parent in parents:
            values = values.setdefault(parent, {})
        values[key] = tensor
    return {"state": state, "param_groups": saved["param_groups"]}


def save_rng_state(path: Path) -> None:
    """This process's random generators (torch, the accelerator's, numpy, Python) as one safetensors file."""
    import random

    import numpy as np
    import torch
    from safetensors.torch import save_file

    version, python_keys, python_gauss = random.getstate()
    numpy_name, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(numpy_keys.astype(np.int64)),
               "python": torch.tensor(python_keys, dtype=torch.int64)}
    if torch.accelerator.is_available():
        tensors["accelerator"] = torch.get_device_module().get_rng_state()
    metadata = {"python": json.dumps([version, python_gauss]),
                "numpy": json.dumps([numpy_name, int(numpy_pos), int(numpy_has_gauss), float(numpy_gauss)])}
    save_file(tensors, str(path), metadata=metadata)


def restore_rng_state(path: Path) -> None:
    """Set this process's random generators to those `save_rng_state` wrote."""
    import random

    import numpy as np
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        metadata, tensors = file.metadata(), {key: file.get_tensor(key) for key in file.keys()}
    torch.set_rng_state(tensors["torch"])
    if "accelerator" in tensors and torch.accelerator.is_available():
        torch.get_device_module().set_rng_state(tensors["accelerator"])
    version, python_gauss = json.loads(metadata["python"])
    random.setstate((version, tuple(tensors["python"].tolist()), python_gauss))
    numpy_name, numpy_pos, numpy_has_gauss, numpy_gauss = json.loads(metadata["numpy"])
    np.random.set_state((numpy_name, tensors["numpy"].numpy().astype(np.uint32), numpy_pos, numpy_has_gauss,
                         numpy_gauss))


def check_checkpoint_files(folder: Path) -> None:
    """Refuse a checkpoint whose safetensors files are truncated or corrupt (header against file size) or
    whose JSON files do not parse, before anything is loaded; the message names the file."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(folder.rglob("*")):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt"):  # reads the header only; checks it covers the file
                    pass
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
        except (SafetensorError, OSError, ValueError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"--resume_from_checkpoint {folder}: {path} is truncated or corrupt ({reason}); resume "
                            f"from an earlier checkpoint-N folder, or drop the flag to start anew.") from None
