"""Per-sample LoRA deltas injected into a frozen causal LM by wrapping its linear layers.

PRAG and DyPRAG both need a model whose MLP projections carry a LoRA that differs per
sample of a batch (each passage, or each question's combination of passages, has its own
A and B), without loading a `peft` adapter per step and without forked model files. While
`inject_lora` is active, each targeted linear layer is replaced in its parent by a thin
wrapper (the PEFT pattern: the original module becomes `base_layer`) that computes

    y = base_layer(x) + scaling * ((x @ A^T) @ B^T)        A: [batch, r, in], B: [batch, out, r]

per sample, with `scaling = alpha / r` exactly as `peft` (no rsLoRA). The wrapper only
calls the base layer, so it works for any layer that behaves like `nn.Linear`: plain,
bitsandbytes 4/8-bit, or ZeRO-3 partitioned (whose own hooks still gather the weight; the
delta never touches it). On exit the original module objects are put back, also when the
forward raised, so the model is exactly what it was.

Weights are keyed by the module path in `model.named_modules()` of the *base* HF model
(e.g. "model.layers.0.mlp.gate_proj"); `to_peft_state_dict`/`save_peft_adapter` turn one
sample into a plain `peft` adapter (keys "base_model.model.<path>.lora_A.weight").
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# module path -> (A [batch, r, in_features], B [batch, out_features, r])
LoraWeights = dict[str, tuple[torch.Tensor, torch.Tensor]]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraSpec:
    """The PRAG/DyPRAG LoRA shape; defaults from the original (r=2, alpha=32, the MLP projections)."""

    rank: int = 2
    alpha: int = 32
    target_modules: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))  # JSON gives lists

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank  # same as peft (no rslora)

    def to_dict(self) -> dict[str, object]:
        return {"rank": self.rank, "alpha": self.alpha, "target_modules": list(self.target_modules)}


def _is_linear(module: nn.Module) -> bool:
    # nn.Linear and its subclasses (bitsandbytes Linear4bit/Linear8bitLt). in/out_features
    # are read from attributes, never from weight.shape, which is empty under ZeRO-3.
    return isinstance(module, nn.Linear) or (hasattr(module, "in_features") and hasattr(module, "out_features"))


def target_module_names(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Every linear layer whose last name component is a target, in `named_modules` (layer) order."""
    names = [name for name, module in model.named_modules()
             if name.split(".")[-1] in spec.target_modules and _is_linear(module)]
    if not names:
        raise ValueError(f"no linear layer named {', '.join(spec.target_modules)} in {type(model).__name__}")
    return names


def module_shapes(model: nn.Module, names: list[str]) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each named linear layer."""
    shapes = {}
    for name in names:
        module = model.get_submodule(name)
        shapes[name] = (module.in_features, module.out_features)
    return shapes


class LoraDeltaLinear(nn.Module):
    """`base_layer(x) + scaling * B(A(x))` with A/B per sample of the batch (or one pair for all).

    A and B are plain tensor attributes, not parameters: the wrapper lives only for the
    duration of `inject_lora`, and gradients (encoding) flow to whatever leaf they came from.
    """

    def __init__(self, base_layer: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_a = lora_a
        self.lora_b = lora_b
        self.scaling = scaling
        # Shaped like the layer it wraps, so wrappers stack (nested injections add their deltas).
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        # The delta is computed in the activation dtype (bf16 under bf16). The second product is
        # fused with the addition (addmm/baddbmm: result + scaling * h @ B^T), which writes the
        # [tokens, out] output once instead of three times (product, scaling, sum).
        lora_a = self.lora_a.to(device=x.device, dtype=x.dtype)
        lora_b = self.lora_b.to(device=x.device, dtype=result.dtype)
        out_features = result.shape[-1]
        if lora_a.shape[0] == 1:  # one LoRA for every sample: plain matmuls, any leading shape
            hidden = (x @ lora_a[0].transpose(0, 1)).to(result.dtype).reshape(-1, lora_a.shape[1])
            delta = torch.addmm(result.reshape(-1, out_features), hidden, lora_b[0].transpose(0, 1),
                                alpha=self.scaling)
            return delta.view(result.shape)
        batch = x.shape[0]
        if lora_a.shape[0] != batch:
            raise ValueError(f"LoRA batch {lora_a.shape[0]} does not match the input batch {batch}")
        flat = x.reshape(batch, -1, x.shape[-1])  # [batch, tokens, in]
        hidden = torch.bmm(flat, lora_a.transpose(1, 2).contiguous()).to(result.dtype)  # [batch, tokens, r]
        delta = torch.baddbmm(result.reshape(batch, -1, out_features), hidden, lora_b.transpose(1, 2),
                              alpha=self.scaling)
        return delta.view(result.shape)


def _check_weights(model: nn.Module, weights: LoraWeights) -> None:
    batches = set()
    for name, (lora_a, lora_b) in weights.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"LoRA weights name module {name!r}, which {type(model).__name__} does not have") from None
        if lora_a.dim() != 3 or lora_b.dim() != 3:
            raise ValueError(f"{name}: A and B must be [batch, r, in] and [batch, out, r], got "
                             f"{tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
        expected_a = (lora_a.shape[0], lora_b.shape[2], module.in_features)
        expected_b = (lora_a.shape[0], module.out_features, lora_a.shape[1])
        if tuple(lora_a.shape) != expected_a or tuple(lora_b.shape) != expected_b:
            raise ValueError(f"{name}: A {tuple(lora_a.shape)} / B {tuple(lora_b.shape)} do not fit a linear layer "
                             f"{module.in_features} -> {module.out_features}")
        batches.add(lora_a.shape[0])
    if len(batches) > 1:
        raise ValueError(f"LoRA weights mix batch sizes {sorted(batches)}")


@contextmanager
def inject_lora(model: nn.Module, weights: LoraWeights, scaling: float) -> Iterator[nn.Module]:
    """Wrap the named linear layers of `model` with per-sample LoRA deltas for the duration.

    Inside, `model(...)` computes `base(x) + scaling * (x @ A^T) @ B^T` for sample i of the
    batch with A[i]/B[i] (a batch-1 pair applies to every sample). The original modules are
    restored on exit, also when the body raises.
    """
    _check_weights(model, weights)
    replaced: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name, (lora_a, lora_b) in weights.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            original = getattr(parent, child)
            setattr(parent, child, LoraDeltaLinear(original, lora_a, lora_b, scaling))
            replaced.append((parent, child, original))
        yield model
    finally:
        for parent, child, original in reversed(replaced):
            setattr(parent, child, original)


def combine_sum(loras: list[LoraWeights]) -> LoraWeights:
    """One LoRA whose delta is the sum of the given LoRAs' deltas (same scaling).

    Concatenating along the rank gives [B1 B2] @ [A1; A2] = B1 A1 + B2 A2: PRAG's combination
    of several passages (peft's `add_weighted_adapter(..., combination_type="cat")` with
    weights 1). Inputs [n, r_i, in] / [n, out, r_i] -> [n, sum r_i, in] / [n, out, sum r_i].
    """
    if not loras:
        raise ValueError("combine_sum needs at least one LoRA")
    names = list(loras[0])
    for lora in loras[1:]:
        if set(lora) != set(names):
            raise ValueError("combine_sum: the LoRAs target different modules")
    return {name: (torch.cat([lora[name][0] for lora in loras], dim=1),
                   torch.cat([lora[name][1] for lora in loras], dim=2)) for name in names}


def select(weights: LoraWeights, index: int) -> LoraWeights:
    """Sample `index` of a stacked LoRA as a batch-1 LoRA (views, no copy)."""
    return {name: (lora_a[index:index + 1], lora_b[index:index + 1]) for name, (lora_a, lora_b) in weights.items()}


def to_peft_state_dict(weights: LoraWeights, index: int) -> dict[str, torch.Tensor]:
    """Sample `index` in peft's saved key layout ("base_model.model.<path>.lora_A.weight" [r, in], ...)."""
    state = {}
    for name, (lora_a, lora_b) in weights.items():
        state[f"base_model.model.{name}.lora_A.weight"] = lora_a[index].detach().contiguous().cpu()
        state[f"base_model.model.{name}.lora_B.weight"] = lora_b[index].detach().contiguous().cpu()
    return state


def publish_file(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename a finished temporary file to its final name, with the permissions a plain open() gives."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp and safetensors create 0600 files
    os.replace(tmp, final)


def write_files_atomic(out: Path, writers: dict[str, Callable[[str], object]]) -> None:
    """Write each file of a folder through a temp file + rename, so none is ever seen half-written."""
    for filename, write in writers.items():
        fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", dir=out)
        os.close(fd)
        try:
            write(tmp)
            publish_file(tmp, out / filename)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def read_peft_adapter(folder: str | os.PathLike) -> tuple[LoraWeights, LoraSpec]:
    """A plain peft LoRA adapter folder as batch-1 weights plus its spec (the inverse of save_peft_adapter)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    state = load_file(str(folder / ADAPTER_WEIGHTS))
    prefix, suffix_a = "base_model.model.", ".lora_A.weight"
    weights = {}
    for key, lora_a in state.items():
        if key.startswith(prefix) and key.endswith(suffix_a):
            name = key[len(prefix):-len(suffix_a)]
            weights[name] = (lora_a[None], state[f"{prefix}{name}.lora_B.weight"][None])
    spec = LoraSpec(rank=config["r"], alpha=config["lora_alpha"], target_modules=tuple(sorted(
        {name.split(".")[-1] for name in weights})))
    return weights, spec


def save_peft_adapter(weights: LoraWeights, index: int, spec: LoraSpec, base_model_name_or_path: str | None,
                      out_dir: str | os.PathLike) -> Path:
    """Write sample `index` as a plain peft adapter folder (adapter_config.json + adapter_model.safetensors).

    `PeftModel.from_pretrained(base, out_dir)` then gives the same outputs as injecting it.
    Each file is written under a temporary name and renamed, so no half-written adapter is left.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    rank = next(iter(weights.values()))[0].shape[1]
    if rank != spec.rank:
        raise ValueError(f"the weights have rank {rank} but the spec says {spec.rank}; pass LoraSpec(rank={rank}, "
                         f"alpha=...) with alpha = scaling * rank")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.target_modules),
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        base_model_name_or_path=base_model_name_or_path)
    config_text = json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)
    write_files_atomic(out, {
        ADAPTER_WEIGHTS: lambda p: save_file(to_peft_state_dict(weights, index), p, metadata={"format": "pt"}),
        ADAPTER_CONFIG: lambda p: Path(p).write_text(config_text, encoding="utf-8")})
    return out
