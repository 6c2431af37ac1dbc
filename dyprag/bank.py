"""The LoRA bank: every passage's PRAG LoRA in safetensors shards plus one `index.json`.

Layout of a bank folder:

    index.json                 format, LoRA spec, base model, module shapes, per shard its
                               sha256/bytes/passage count, per passage id [shard, row] (the
                               ids of one text trained the same way share a row)
    shard-00000.safetensors    per targeted module "<path>.lora_A" [n, r, in] and
    shard-00001.safetensors    "<path>.lora_B" [n, out, r]: row i is the shard's i-th passage
    init/                      (written by the encode stage) the shared initial adapter, peft format

Writing is crash-safe: a shard is written under a temporary name and renamed when complete,
and the index (always last) is replaced atomically after every shard, so a killed run leaves
a consistent bank of the passages finished so far. Several writers (one per rank) write
parts (`part="rank00001"`: shards `rank00001-shard-*.safetensors`, index `index.rank00001.json`)
that `merge_parts` joins into one `index.json`.

Reading memory-maps the shards (safetensors `safe_open`, handles cached): loading a batch of
passages copies only their rows, module by module, with one gather per shard. A shard whose
size or sha256 differs from the index is reported by name (`LoraBankError`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .lora import LoraSpec, LoraWeights, publish_file, save_peft_adapter

INDEX_FILE = "index.json"
FORMAT = "dyprag-lora-bank"
VERSION = 1
_PART_INDEX = re.compile(r"^index\.(.+)\.json$")


class LoraBankError(ValueError):
    """A bank folder that is missing, incomplete or corrupt; the message names the file."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json_atomic(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1), encoding="utf-8")
    publish_file(tmp, path)


def _read_index(path: Path) -> dict[str, Any]:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
        raise LoraBankError(f"LoRA bank index {path} cannot be read ({err}); re-run the encode stage.") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise LoraBankError(f"{path} is not a LoRA bank index (format {FORMAT!r}).")
    return index


def _check_shard(file: Path, info: dict[str, Any], verify: bool = True) -> None:
    """A shard file against its index entry: present, of the indexed size, and (with `verify`) sha256."""
    if not file.is_file():
        raise LoraBankError(f"LoRA bank shard {file} is missing; re-run the encode stage.")
    if file.stat().st_size != info["bytes"]:
        raise LoraBankError(f"LoRA bank shard {file} is truncated or corrupt ({file.stat().st_size} bytes, "
                            f"the index says {info['bytes']}); re-run the encode stage.")
    if verify and _sha256(file) != info["sha256"]:
        raise LoraBankError(f"LoRA bank shard {file} is corrupt (sha256 differs from the index); re-run the "
                            f"encode stage.")


def check_shards(path: str | os.PathLike) -> None:
    """Check every shard of a bank folder, its index.json and part indexes alike (size and sha256)."""
    folder = Path(path)
    for index_path in [folder / INDEX_FILE, *part_indexes(folder)]:
        if index_path.is_file():
            for name, info in _read_index(index_path)["shards"].items():
                _check_shard(folder / name, info)


class LoraBankWriter:
    """Append passages' LoRAs to a bank folder; `close()` (or leaving the `with` block) finishes it.

    `add(passage_id, weights, index=0, aliases=())` takes row `index` of stacked weights, stored
    once for the id and its aliases; rows are buffered and written `shard_size` per shard. With
    `part`, this writer owns the shards and index of one part (one rank); `merge_parts` builds the
    bank's index.json.
    An existing index of the same part is continued (resuming), never overwritten.
    """

    def __init__(self, path: str | os.PathLike, spec: LoraSpec, base_model_name_or_path: str | None,
                 shard_size: int = 256, part: str | None = None, dtype: torch.dtype | None = None) -> None:
        if shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.spec, self.shard_size, self.dtype = spec, shard_size, dtype
        self.prefix = f"{part}-shard" if part else "shard"
        self.index_path = self.path / (f"index.{part}.json" if part else INDEX_FILE)
        if self.index_path.is_file():  # resume this part: keep its shards, continue the numbering
            self.index = _read_index(self.index_path)
            if LoraSpec(**self.index["spec"]) != spec:
                raise LoraBankError(f"{self.index_path} was written with {self.index['spec']}, not {spec.to_dict()}.")
        else:
            self.index = {"format": FORMAT, "version": VERSION, "spec": spec.to_dict(),
                          "base_model_name_or_path": base_model_name_or_path, "dtype": None, "modules": None,
                          "shards": {}, "passages": {}}
        self._buffer: list[tuple[list[str], dict[str, tuple[torch.Tensor, torch.Tensor]]]] = []

    @property
    def passage_ids(self) -> set[str]:
        """Ids already written (in finished shards) or buffered."""
        return set(self.index["passages"]) | {pid for ids, _ in self._buffer for pid in ids}

    def add(self, passage_id: str, weights: LoraWeights, index: int = 0, aliases: Sequence[str] = ()) -> None:
        taken = [pid for pid in (passage_id, *aliases) if pid in self.passage_ids]
        if taken or len({passage_id, *aliases}) != 1 + len(aliases):
            raise ValueError(f"passage {(taken or [passage_id])[0]!r} is already in the bank")
        modules = {name: [a.shape[2], b.shape[1]] for name, (a, b) in weights.items()}
        if self.index["modules"] is None:
            self.index["modules"] = modules
        elif modules != self.index["modules"]:
            raise ValueError(f"passage {passage_id!r} targets other modules/shapes than the bank")
        rank = next(iter(weights.values()))[0].shape[1]
        if rank != self.spec.rank:
            raise ValueError(f"passage {passage_id!r} has rank {rank}, the bank {self.spec.rank}")
        row = {name: (a[index].detach().to("cpu", self.dtype or a.dtype).clone(),
                      b[index].detach().to("cpu", self.dtype or b.dtype).clone()) for name, (a, b) in weights.items()}
        self._buffer.append(([passage_id, *aliases], row))
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the buffered passages as one shard, then the index (both atomically)."""
        if not self._buffer:
            return
        from safetensors.torch import save_file

        number = len([s for s in self.index["shards"] if s.startswith(self.prefix + "-")])
        name = f"{self.prefix}-{number:05d}.safetensors"
        while (self.path / name).exists():  # a stale shard of a killed run that never reached the index
            number += 1
            name = f"{self.prefix}-{number:05d}.safetensors"
        ids = [ids[0] for ids, _ in self._buffer]
        tensors = {}
        for module in self.index["modules"]:
            tensors[f"{module}.lora_A"] = torch.stack([row[module][0] for _, row in self._buffer])
            tensors[f"{module}.lora_B"] = torch.stack([row[module][1] for _, row in self._buffer])
        tmp = self.path / f".{name}.tmp"
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "passage_ids": json.dumps(ids)})
        digest = _sha256(tmp)
        publish_file(tmp, self.path / name)
        self.index["dtype"] = str(tensors[next(iter(tensors))].dtype).removeprefix("torch.")
        self.index["shards"][name] = {"sha256": digest, "bytes": (self.path / name).stat().st_size,
                                      "passages": len(ids)}
        for row, (aliases, _) in enumerate(self._buffer):
            for pid in aliases:
                self.index["passages"][pid] = [name, row]
        _write_json_atomic(self.index_path, self.index)
        self._buffer = []

    def close(self) -> Path:
        self.flush()
        if not self.index_path.is_file():  # nothing added: still a valid (empty) bank or part
            _write_json_atomic(self.index_path, self.index)
        return self.path

    def __enter__(self) -> LoraBankWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()  # on an error the finished shards stay indexed; the buffer is dropped


def part_indexes(path: str | os.PathLike) -> list[Path]:
    """The part indexes (`index.<part>.json`) of a bank folder, sorted by name."""
    return sorted(p for p in Path(path).glob("index.*.json") if _PART_INDEX.match(p.name))


def merge_parts(path: str | os.PathLike) -> Path:
    """Join the bank's index.json (if any) and every part index into one index.json; remove the parts.

    All parts must share the spec and base model; a passage id in two parts is an error.
    """
    folder = Path(path)
    sources = ([folder / INDEX_FILE] if (folder / INDEX_FILE).is_file() else []) + part_indexes(folder)
    if not sources:
        raise LoraBankError(f"{folder} holds no LoRA bank index to merge.")
    merged: dict[str, Any] | None = None
    for source in sources:
        index = _read_index(source)
        if merged is None:
            merged = {**index, "shards": {}, "passages": {}}
        for key in ("spec", "base_model_name_or_path"):
            if index[key] != merged[key]:
                raise LoraBankError(f"{source} has {key} {index[key]!r}, other parts {merged[key]!r}.")
        for key in ("modules", "dtype"):
            if merged[key] is None:
                merged[key] = index[key]
            elif index[key] is not None and index[key] != merged[key]:
                raise LoraBankError(f"{source} has other {key} than the rest of the bank.")
        duplicates = set(index["passages"]) & set(merged["passages"])
        if duplicates:
            raise LoraBankError(f"{source} repeats passage ids already in the bank, e.g. {sorted(duplicates)[0]!r}.")
        merged["shards"].update(index["shards"])
        merged["passages"].update(index["passages"])
    _write_json_atomic(folder / INDEX_FILE, merged)
    for source in sources:
        if source.name != INDEX_FILE:
            source.unlink()
    return folder / INDEX_FILE


class LoraBank:
    """Read a bank: `load(ids)` stacks their LoRAs, `export_peft(id, dir)` writes one as a peft adapter.

    Shards are memory-mapped on first use and kept open; with `verify` (default) each shard's
    size and sha256 are checked against the index when it is first opened.
    """

    def __init__(self, path: str | os.PathLike, verify: bool = True) -> None:
        self.path = Path(path)
        index_path = self.path / INDEX_FILE
        if not index_path.is_file():
            hint = (" (only part indexes: the encode run did not finish; re-run it with --resume_from_checkpoint "
                    "last)" if part_indexes(self.path) else "")
            raise LoraBankError(f"no LoRA bank at {self.path}: {INDEX_FILE} is missing{hint}.")
        self.index = _read_index(index_path)
        self.spec = LoraSpec(**self.index["spec"])
        self.base_model_name_or_path: str | None = self.index["base_model_name_or_path"]
        self.passage_ids: list[str] = list(self.index["passages"])
        self.modules: list[str] = list(self.index["modules"] or [])
        self.verify = verify
        self._shards: dict[str, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.passage_ids)

    def __contains__(self, passage_id: str) -> bool:
        return passage_id in self.index["passages"]

    def check(self, ids: Sequence[str]) -> None:
        """Open (and so check) every shard holding `ids` now, so a corrupt one fails before any work is done."""
        for name in sorted({self.index["passages"][pid][0] for pid in ids if pid in self.index["passages"]}):
            self._shard(name)

    def _shard(self, name: str) -> dict[str, torch.Tensor]:
        """Memory-mapped tensors of one shard (opened and checked once)."""
        if name not in self._shards:
            from safetensors import SafetensorError, safe_open

            file = self.path / name
            _check_shard(file, self.index["shards"][name], self.verify)
            try:
                with safe_open(str(file), framework="pt") as handle:  # tensors stay backed by the mmap
                    self._shards[name] = {key: handle.get_tensor(key) for key in handle.keys()}
            except SafetensorError as err:
                raise LoraBankError(f"LoRA bank shard {file} is corrupt ({err}); re-run the encode stage.") from None
        return self._shards[name]

    def load(self, ids: Sequence[str], dtype: torch.dtype | None = None,
             device: torch.device | str | None = None) -> LoraWeights:
        """LoRAs of `ids` stacked in that order: A [len(ids), r, in], B [len(ids), out, r]."""
        missing = [pid for pid in ids if pid not in self.index["passages"]]
        if missing:
            raise KeyError(f"passage(s) not in the LoRA bank {self.path}: {', '.join(map(str, missing[:5]))}"
                           f"{' ...' if len(missing) > 5 else ''}")
        groups: dict[str, tuple[list[int], list[int]]] = {}  # shard -> (rows in shard, positions in ids)
        for position, pid in enumerate(ids):
            shard, row = self.index["passages"][pid]
            rows, positions = groups.setdefault(shard, ([], []))
            rows.append(row)
            positions.append(position)
        gathers = [(self._shard(shard), torch.tensor(rows), positions) for shard, (rows, positions) in groups.items()]
        order = torch.argsort(torch.tensor([p for _, _, positions in gathers for p in positions]))
        weights = {}
        for module in self.modules:
            pair = []
            for suffix in ("lora_A", "lora_B"):
                parts = [tensors[f"{module}.{suffix}"].index_select(0, rows) for tensors, rows, _ in gathers]
                stacked = parts[0] if len(parts) == 1 else torch.cat(parts).index_select(0, order)
                pair.append(stacked.to(device=device, dtype=dtype or stacked.dtype))
            weights[module] = (pair[0], pair[1])
        return weights

    def export_peft(self, passage_id: str, out_dir: str | os.PathLike) -> Path:
        """Write one passage's LoRA as a plain peft adapter folder (loads with PeftModel.from_pretrained)."""
        return save_peft_adapter(self.load([passage_id]), 0, self.spec, self.base_model_name_or_path, out_dir)
