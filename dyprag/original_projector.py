"""The original DyPRAG's projector checkpoints (`epoch_N.pt`) as our `Projector`.

The original (`src/projector.py`) saves `torch.save({"model_state_dict": state_dict}, "epoch_N.pt")`
with one `Projector` per (module kind, layer), keys `projector.{kind}_{layer}.projector.<name>`:

    pre_A_linear.weight   [p, hidden + 1]   first layer of A's MLP (input: hidden state ⊕ layer index)
    post_A_linear.weight  [r * in, p]       A = post_A(relu(pre_A([x, l]))) -> [r, in]
    pre_B_linear.weight   [p, hidden + 1]
    post_B_linear.weight  [out * r, p]      B = post_B(relu(pre_B([x, l]))) -> [out, r]

(`A_hypernet.linear1/2` and `B_hypernet.linear1/2` name the same tensors again). No biases; the
last input column multiplies the raw layer number l, so its contribution is the constant
l * column, which is exactly our per-layer vector `u[l]` (`dyprag.projector_model`). The two MLPs of
a (kind, layer) are our stacked `w_in[l]` (first layers side by side), `w_a[l]` and `w_b[l]`
(the output layers, transposed; the flat order of A and B is the same).

The original applies the generated LoRA as B @ A with no alpha/r (its patched `LlamaMLP`), so
the converted projector's LoRA spec has alpha == rank (scaling 1): the deltas it injects, and
the peft adapters `stages.projector_export` writes, equal the original's. It reads passages as
the original does: the last token's final hidden state, cut at 3000 tokens.

The file is read with `torch.load(weights_only=True)`: tensors and plain containers only,
never an arbitrary pickled object.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from torch import nn

from .lora import LoraSpec
from .projector_model import Projector, ProjectorConfig

KEY = re.compile(r"projector\.(?P<kind>\w+?)_(?P<layer>\d+)\.projector\.(?P<name>(pre|post)_[AB]_linear)\.weight")
ORIGINAL_MAX_PASSAGE_LENGTH = 3000  # the original's passage tokenizer truncation


class OriginalCheckpointError(ValueError):
    """A file that is not an original DyPRAG projector checkpoint for the given model; the message says why."""


def read_original_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of an original `epoch_N.pt` ({"model_state_dict": ...} or the bare state dict), on the CPU."""
    import pickle

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OriginalCheckpointError(f"{path} cannot be read as tensors only ({first})") from None
    state = saved.get("model_state_dict", saved) if isinstance(saved, dict) else None
    if not isinstance(state, dict) or not any(KEY.fullmatch(key) for key in state):
        raise OriginalCheckpointError(f"{path} holds no original DyPRAG projector weights "
                                      f"(keys like projector.gate_proj_0.projector.pre_A_linear.weight)")
    return {key: value for key, value in state.items() if KEY.fullmatch(key)}


def original_layers(state: dict[str, torch.Tensor]) -> dict[str, dict[int, dict[str, torch.Tensor]]]:
    """kind -> layer -> {pre_A_linear, post_A_linear, pre_B_linear, post_B_linear} weights."""
    kinds: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, value in state.items():
        match = KEY.fullmatch(key)
        kinds.setdefault(match["kind"], {}).setdefault(int(match["layer"]), {})[match["name"]] = value
    return kinds


def config_for_original(state: dict[str, torch.Tensor], model: nn.Module, **kwargs: Any) -> ProjectorConfig:
    """Our projector config for an original checkpoint and the base model it was trained on.

    The rank and the width p come from the weights' shapes; the modules are the model's layers
    of the checkpoint's kinds, which must be exactly the checkpoint's (kind, layer) pairs.
    """
    kinds = original_layers(state)
    first_kind = next(iter(kinds))
    first = kinds[first_kind][min(kinds[first_kind])]
    width, hidden = first["pre_A_linear"].shape[0], first["pre_A_linear"].shape[1] - 1
    if hidden != model.config.hidden_size:
        raise OriginalCheckpointError(f"the checkpoint reads hidden states of size {hidden}, the model's are "
                                      f"{model.config.hidden_size}: it was trained for another base model")
    config = ProjectorConfig.for_model(model, LoraSpec(rank=2, alpha=2, target_modules=tuple(kinds)),
                                        projector_p=width, pooling="last",
                                        max_passage_length=ORIGINAL_MAX_PASSAGE_LENGTH, **kwargs)
    in_features = config.modules[config.kinds()[first_kind][0]][0]
    rank = first["post_A_linear"].shape[0] // in_features
    config.spec = LoraSpec(rank=rank, alpha=rank, target_modules=tuple(kinds))  # scaling 1: the original's B @ A
    model_layers = {kind: len(names) for kind, names in config.kinds().items()}
    saved_layers = {kind: len(layers) for kind, layers in kinds.items()}
    if model_layers != saved_layers or any(sorted(layers) != list(range(len(layers))) for layers in kinds.values()):
        raise OriginalCheckpointError(f"the checkpoint has layers {saved_layers} per module, the model "
                                      f"{model_layers}: it was trained for another base model")
    return config


def projector_from_original(state: dict[str, torch.Tensor], config: ProjectorConfig) -> Projector:
    """Our projector computing the same A and B as the original for every hidden state (fp32)."""
    projector = Projector(config)
    tensors = {}
    for kind, layers in original_layers(state).items():
        ordered = [layers[layer] for layer in range(len(layers))]
        tensors[f"kinds.{kind}.w_in"] = torch.stack([torch.cat([w["pre_A_linear"][:, :-1].T,
                                                                w["pre_B_linear"][:, :-1].T], dim=1) for w in ordered])
        tensors[f"kinds.{kind}.layer_in"] = torch.stack([layer * torch.cat([w["pre_A_linear"][:, -1],
                                                                            w["pre_B_linear"][:, -1]])
                                                         for layer, w in enumerate(ordered)])
        tensors[f"kinds.{kind}.w_a"] = torch.stack([w["post_A_linear"].T for w in ordered])
        tensors[f"kinds.{kind}.w_b"] = torch.stack([w["post_B_linear"].T for w in ordered])
    expected = {key: tuple(value.shape) for key, value in projector.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in tensors.items()}
    if expected != found:
        wrong = sorted(key for key in expected.keys() | found.keys() if expected.get(key) != found.get(key))
        raise OriginalCheckpointError(f"the checkpoint's weights do not fit the model's layers ({wrong[0]}: "
                                      f"{found.get(wrong[0])} against {expected.get(wrong[0])})")
    projector.load_state_dict({key: value.float().contiguous() for key, value in tensors.items()})
    return projector
