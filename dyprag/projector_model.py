"""DyPRAG's parameter projector: a passage's hidden state in, a LoRA for every targeted layer out.

The frozen base model reads the passage; its last-layer hidden state, pooled over the passage
(the last token as in the original, or the mean over the passage's tokens), is the
projector's input x [N, hidden]. For every (layer, module) of the LoRA target list there is
one small MLP, as in the original (`Projector` / `ProjectorLoRA`):

    h     = relu(x @ W_in[l] + u[l])            W_in [hidden, 2p], u [2p]
    A     = h[:p] @ W_A[l]  -> [r, in]           (one MLP of width p for A ...)
    B     = h[p:] @ W_B[l]  -> [out, r]          (... and one for B)

The original feeds the layer index as an extra input feature of every MLP; here the input is
hidden ⊕ one-hot(layer index), and since the one-hot part multiplies only its own row of the
first weight, that row is kept as what it is: `u[l]`, a learned vector per (layer, module)
added before the ReLU. The MLPs of one module kind (all layers' gate_proj, say) are stored
stacked ([layers, ...]) and run as one batched product, so a 32-layer model costs three
einsum chains per output, not 96 small MLP calls; each layer's slice is still its own MLP.

Initialisation: the first layer as `nn.Linear` (uniform +-1/sqrt(fan_in)), the output heads
normal with a tiny std (`init_std`), so the first generated A and B are near zero, the first
delta B @ A is ~0 and the student starts as the base model (the original uses std 1e-7 on
both layers; a normal first layer keeps the hidden units alive so the heads get gradients).

Outputs are `dyprag.lora` LoraWeights (module path -> A [N, r, in], B [N, out, r]), so they
are injected with `inject_lora` and saved as a plain peft adapter with `save_peft_adapter`.
A projector folder holds `projector.safetensors` + `projector_config.json`.

Several passages (a question's top-k) give several LoRAs; `combine_loras` merges them:

- "factors" (default): average the A's and the B's separately, A = mean A_i, B = mean B_i.
  This is what the original DyPRAG does at inference, so its published numbers are
  reproduced; the result keeps rank r, so injection costs the same for any k. Its delta
  (mean B_i)(mean A_i) contains cross terms B_i A_j, which only approximate a mixture of
  the passages' deltas.
- "deltas": average the deltas, (1/k) sum B_i A_i, exactly, by rank concatenation
  ([B_1 .. B_k]/k, [A_1; ..; A_k], rank k*r). The cleaner mixture, at k times the LoRA cost.
PRAG's bank LoRAs are summed instead (`dyprag.lora.combine_sum`), as in the original PRAG.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .lora import (LoraSpec, LoraWeights, combine_sum, inject_lora, module_shapes, select, target_module_names,
                   write_files_atomic)
from .padding import IGNORE_INDEX, pad_rows

CONFIG_FILE = "projector_config.json"
WEIGHTS_FILE = "projector.safetensors"
FORMAT = "dyprag-projector"
# Projector folders of release 0.1.0 name the files (and the format) after a "translator"; they are read as well,
# until the next release.
TRANSLATOR_FILES, TRANSLATOR_FORMAT = ("translator_config.json", "translator.safetensors"), "dyprag-translator"
POOLINGS = ("last", "mean")
COMBINATIONS = ("factors", "deltas")


@dataclass
class ProjectorConfig:
    """Everything needed to rebuild a projector and feed it the way it was trained."""

    hidden_size: int
    modules: dict[str, tuple[int, int]]  # module path -> (in_features, out_features), layer order
    spec: LoraSpec = field(default_factory=LoraSpec)
    projector_p: int = 32
    pooling: Literal["last", "mean"] = "last"
    max_passage_length: int = 512
    init_std: float = 1e-5
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.projector_p < 1:
            raise ValueError(f"projector_p must be positive, got {self.projector_p}")
        self.modules = {name: tuple(shape) for name, shape in self.modules.items()}

    @classmethod
    def for_model(cls, model: nn.Module, spec: LoraSpec, **kwargs: Any) -> ProjectorConfig:
        """The config of a projector for `model`'s targeted linear layers."""
        names = target_module_names(model, spec)
        return cls(hidden_size=model.config.hidden_size, modules=module_shapes(model, names), spec=spec, **kwargs)

    def kinds(self) -> dict[str, list[str]]:
        """Module paths grouped by their last name component (one stacked MLP group each), layer order kept."""
        groups: dict[str, list[str]] = {}
        for name in self.modules:
            groups.setdefault(name.split(".")[-1], []).append(name)
        return groups

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": 1, "hidden_size": self.hidden_size,
                "modules": {name: list(shape) for name, shape in self.modules.items()}, "spec": self.spec.to_dict(),
                "projector_p": self.projector_p, "pooling": self.pooling,
                "max_passage_length": self.max_passage_length, "init_std": self.init_std,
                "base_model_name_or_path": self.base_model_name_or_path}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ProjectorConfig:
        if values.get("format") not in (FORMAT, TRANSLATOR_FORMAT):
            raise ValueError(f"not a projector config (format {FORMAT!r})")
        keys = ("hidden_size", "modules", "projector_p", "pooling", "max_passage_length", "init_std",
                "base_model_name_or_path")
        return cls(spec=LoraSpec(**values["spec"]), **{key: values[key] for key in keys})


class _KindProjector(nn.Module):
    """The MLPs of every layer's copy of one module kind, stacked on a leading layer axis."""

    def __init__(self, layers: int, hidden: int, width: int, rank: int, in_features: int, out_features: int,
                 init_std: float) -> None:
        super().__init__()
        self.width, self.rank, self.in_features, self.out_features = width, rank, in_features, out_features
        bound = 1 / math.sqrt(hidden + layers)  # nn.Linear's init for the input hidden ⊕ one-hot(layer)
        self.w_in = nn.Parameter(torch.empty(layers, hidden, 2 * width).uniform_(-bound, bound))
        self.layer_in = nn.Parameter(torch.empty(layers, 2 * width).uniform_(-bound, bound))
        self.w_a = nn.Parameter(torch.randn(layers, width, rank * in_features) * init_std)
        self.w_b = nn.Parameter(torch.randn(layers, width, out_features * rank) * init_std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> A [layers, N, r, in], B [layers, N, out, r]."""
        hidden = torch.relu(torch.einsum("nh,lhq->lnq", x, self.w_in) + self.layer_in[:, None, :])
        lora_a = torch.einsum("lnp,lpk->lnk", hidden[..., :self.width], self.w_a)
        lora_b = torch.einsum("lnp,lpk->lnk", hidden[..., self.width:], self.w_b)
        layers, count = lora_a.shape[:2]
        return (lora_a.view(layers, count, self.rank, self.in_features),
                lora_b.view(layers, count, self.out_features, self.rank))


class Projector(nn.Module):
    """Pooled passage hidden states [N, hidden] -> LoraWeights with A [N, r, in], B [N, out, r]."""

    def __init__(self, config: ProjectorConfig) -> None:
        super().__init__()
        self.config = config
        self.kinds = nn.ModuleDict()
        for kind, names in config.kinds().items():
            shapes = {config.modules[name] for name in names}
            if len(shapes) != 1:
                raise ValueError(f"the {kind} layers differ in shape ({sorted(shapes)}); one MLP group needs one shape")
            in_features, out_features = shapes.pop()
            self.kinds[kind] = _KindProjector(len(names), config.hidden_size, config.projector_p, config.spec.rank,
                                               in_features, out_features, config.init_std)

    def forward(self, hidden: torch.Tensor) -> LoraWeights:
        weights: LoraWeights = {}
        hidden = hidden.to(next(self.parameters()).dtype)
        for kind, names in self.config.kinds().items():
            lora_a, lora_b = self.kinds[kind](hidden)
            for layer, name in enumerate(names):
                weights[name] = (lora_a[layer], lora_b[layer])
        return {name: weights[name] for name in self.config.modules}  # the model's module order


def save_projector(projector: Projector, out_dir: str | os.PathLike,
                    state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write projector.safetensors (fp32) + projector_config.json into `out_dir`, each file atomically.

    `state` overrides the module's own tensors (e.g. the fp32 master weights gathered from a
    DeepSpeed engine whose module is in bf16 or partitioned).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = state if state is not None else projector.state_dict()
    tensors = {key: value.detach().float().contiguous().cpu() for key, value in tensors.items()}
    config_text = json.dumps(projector.config.to_dict(), indent=2)
    write_files_atomic(out, {
        WEIGHTS_FILE: lambda p: save_file(tensors, p, metadata={"format": FORMAT}),
        CONFIG_FILE: lambda p: Path(p).write_text(config_text, encoding="utf-8")})
    return out


class ProjectorError(ValueError):
    """A projector folder that is missing, truncated or corrupt; the message names the file."""


def projector_files(folder: str | os.PathLike) -> tuple[Path, Path]:
    """The config and weights files of a projector folder: ours, or the translator_* names of release 0.1.0."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() and (folder / TRANSLATOR_FILES[0]).is_file():
        return folder / TRANSLATOR_FILES[0], folder / TRANSLATOR_FILES[1]
    return folder / CONFIG_FILE, folder / WEIGHTS_FILE


def load_projector(folder: str | os.PathLike, device: torch.device | str | None = None) -> Projector:
    """A saved projector (fp32, eval mode, no gradients) from its folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_file, weights_file = projector_files(folder)
    try:
        config = ProjectorConfig.from_dict(json.loads(config_file.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ProjectorError(f"projector config {config_file} cannot be read ({err}); point at a "
                              f"stages.projector output_dir or one of its checkpoint-N folders.") from None
    projector = Projector(config)
    try:
        projector.load_state_dict(load_file(str(weights_file)))
    except (OSError, SafetensorError, RuntimeError) as err:  # RuntimeError: tensors of another projector
        first = str(err).strip().splitlines()[0]
        raise ProjectorError(f"projector weights {weights_file} are missing, truncated or corrupt "
                              f"({first}); train the projector again (python -m stages.projector) or use another "
                              f"checkpoint-N folder.") from None
    return projector.to(device).eval().requires_grad_(False)


# -------------------------------------------------------------------------------- passages in

@torch.no_grad()
def passage_hidden(model: nn.Module, passages: Sequence[Sequence[int]], pad_id: int,
                   pooling: str = "last") -> torch.Tensor:
    """The frozen model's last-layer hidden state of each tokenized passage, pooled: [N, hidden].

    Passages are right-padded and run without an attention mask: under causal attention a real
    token never sees the pads after it, so its state is the unpadded one (and SDPA keeps its
    fast causal path). "last" takes the state of the passage's last token (the original),
    "mean" averages its tokens' states. The backbone is called without the LM head (only the
    hidden states are needed; `model.base_model` is the decoder of any HF causal LM).
    """
    device = next(model.parameters()).device
    input_ids = pad_rows(passages, pad_id).to(device)
    states = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state  # [N, T, hidden]
    lengths = torch.tensor([len(p) for p in passages], device=device)
    if pooling == "last":
        return states[torch.arange(len(passages), device=device), lengths - 1]
    mask = torch.arange(states.shape[1], device=device)[None, :] < lengths[:, None]
    return (states * mask[..., None]).sum(dim=1) / lengths[:, None].to(states.dtype)


def tokenize_passages(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Passage token ids as the projector reads them (the tokenizer's own special tokens, cut to max_length)."""
    return [(tokenizer.encode(text) or [tokenizer.eos_token_id])[:max_length] for text in texts]


# ---------------------------------------------------------------------------------- training

def qa_text(tokenizer: Any, question: str, answer: str, passages: Sequence[str] | None = None,
            with_cot: bool = False, fewshot: str | None = None) -> tuple[list[int], int]:
    """Token ids of a QA training text (the original prompt + "The answer is <answer>.", or with
    `with_cot` the chain-of-thought prompt with its few-shot block + "Answer: <answer>") and where
    the answer starts.

    The answer starts where the text leaves the inference prompt (`get_prompt` without an
    answer), so the answer-token loss covers exactly what the model has to produce after that prompt.
    """
    from .prompts import get_prompt

    prompt = get_prompt(tokenizer, question, passages, with_cot=with_cot, fewshot=fewshot)
    text = get_prompt(tokenizer, question, passages, answer, with_cot=with_cot, fewshot=fewshot)
    start = next((i for i, (a, b) in enumerate(zip(prompt, text)) if a != b), len(prompt))
    return text, start


def answer_logits(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a labelled token, and those tokens: [n, vocab] fp32, [n].

    `labels` is IGNORE_INDEX except on the tokens that carry the loss (the answer). The LM head is
    applied to those positions only: a QA prompt of a few hundred tokens has an answer of a
    few, and [batch, tokens, vocab] logits would dominate the memory of the whole step.
    Right padding, no attention mask: see `passage_hidden`.
    """
    states = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX  # position t predicts token t + 1
    logits = model.get_output_embeddings()(states[:, :-1][keep])
    return logits.float(), targets[keep]


def distillation_losses(model: nn.Module, generated: LoraWeights, real: LoraWeights, scaling: float,
                        input_ids: torch.Tensor, labels: torch.Tensor, student_scaling: float | None = None,
                        kl_per_text: bool = False) -> dict[str, torch.Tensor]:
    """DyPRAG's loss terms for a batch of (passage, real LoRA, QA text) with per-sample LoRAs.

    - lm: cross-entropy of the model with the generated LoRA injected, mean over the labelled
      tokens (`labels` != IGNORE_INDEX: the answer, or the whole text);
    - kl: KL(teacher || student) per labelled token (summed over the vocabulary), mean over those
      tokens, or with `kl_per_text` summed over each text's tokens and averaged over the texts (the
      original's `batchmean`); teacher = the same model with the passage's real (bank) LoRA injected
      at `scaling`, no gradient; the student's LoRA is injected at `student_scaling` (default
      `scaling`; the original injects it unscaled, 1.0);
    - mse: sum over modules of the mean squared error of generated vs real A and of B (the
      original's sum of per-module `F.mse_loss`);
    - teacher_lm: the teacher's cross-entropy, for reference (what the student can reach).
    Padding never counts: only labelled tokens are scored.
    """
    import torch.nn.functional as F

    with torch.no_grad(), inject_lora(model, real, scaling):
        teacher, targets = answer_logits(model, input_ids, labels)
    with inject_lora(model, generated, scaling if student_scaling is None else student_scaling):
        student, _ = answer_logits(model, input_ids, labels)
    student_log = student.log_softmax(dim=-1)
    teacher_log = teacher.log_softmax(dim=-1)
    kl = F.kl_div(student_log, teacher_log, log_target=True, reduction="none").sum(dim=-1)
    kl = kl.sum() / len(input_ids) if kl_per_text else kl.mean()
    mse = sum(F.mse_loss(generated[name][0].float(), real_a.float()) + F.mse_loss(generated[name][1].float(),
                                                                                    real_b.float())
              for name, (real_a, real_b) in real.items())
    return {"lm": F.nll_loss(student_log, targets), "kl": kl, "mse": mse,
            "teacher_lm": F.nll_loss(teacher_log, targets)}


# ------------------------------------------------------------------------------- LoRAs out

def combine_loras(loras: Sequence[LoraWeights], how: str = "factors") -> LoraWeights:
    """One batch-1 LoRA from several (see the module docstring for the two rules)."""
    if how not in COMBINATIONS:
        raise ValueError(f"combination must be one of {COMBINATIONS}, got {how!r}")
    if how == "factors":
        return {name: (torch.stack([lora[name][0] for lora in loras]).mean(dim=0),
                       torch.stack([lora[name][1] for lora in loras]).mean(dim=0)) for name in loras[0]}
    summed = combine_sum(list(loras))
    return {name: (lora_a, lora_b / len(loras)) for name, (lora_a, lora_b) in summed.items()}


class ProjectorLoras:
    """DyPRAG's LoRA provider (`dyprag.inference`): each record's top-k passages through the projector, combined.

    All passages of a batch of records are read by the frozen model and translated in one go;
    a record without passages gets a zero LoRA. `model` is the same frozen model that answers
    (called here while no LoRA is injected).
    """

    def __init__(self, projector: Projector, model: nn.Module, tokenizer: Any, top_k: int = 3,
                 combination: str = "factors") -> None:
        if combination not in COMBINATIONS:
            raise ValueError(f"combination must be one of {COMBINATIONS}, got {combination!r}")
        self.projector, self.model, self.tokenizer = projector, model, tokenizer
        self.top_k, self.combination = top_k, combination
        self.scaling = projector.config.spec.scaling

    @torch.no_grad()
    def generate(self, texts: Sequence[str]) -> LoraWeights:
        """One generated LoRA per passage text, stacked: A [N, r, in], B [N, out, r]."""
        config = self.projector.config
        ids = tokenize_passages(self.tokenizer, texts, config.max_passage_length)
        hidden = passage_hidden(self.model, ids, self.tokenizer.pad_token_id, config.pooling)
        return self.projector(hidden.to(next(self.projector.parameters()).device))

    def __call__(self, records: Sequence[dict[str, Any]]) -> LoraWeights:
        from .inference import stack_loras

        groups = [list(record.get("passages") or [])[:self.top_k] for record in records]
        flat = [text for group in groups for text in group]
        generated = self.generate(flat) if flat else None
        singles, start = [], 0
        for group in groups:
            if not group:
                singles.append(self._zeros())
                continue
            rows = [select(generated, i) for i in range(start, start + len(group))]
            singles.append(combine_loras(rows, self.combination))
            start += len(group)
        return stack_loras(singles)

    def _zeros(self) -> LoraWeights:
        rank = self.projector.config.spec.rank
        param = next(self.projector.parameters())
        return {name: (param.new_zeros(1, rank, in_features), param.new_zeros(1, out_features, rank))
                for name, (in_features, out_features) in self.projector.config.modules.items()}


def check_projector_fits(projector: Projector, model: nn.Module) -> None:
    """Refuse (`ProjectorError`) a projector trained for a model whose targeted layers or hidden size differ."""
    config = projector.config
    try:
        expected = ProjectorConfig.for_model(model, config.spec)
    except ValueError as err:  # the model lacks the targeted modules
        raise ProjectorError(f"the projector targets layers this model lacks ({err}); it was trained for "
                             f"{config.base_model_name_or_path}: use that model.") from None
    if (expected.modules, expected.hidden_size) != (config.modules, config.hidden_size):
        raise ProjectorError(f"the projector was trained for {config.base_model_name_or_path}, whose layers differ "
                             f"from this model's: use that model.")


def load_projector_loras(folder: str | os.PathLike, model: nn.Module, tokenizer: Any, top_k: int = 3,
                         combination: str = "factors", device: torch.device | str | None = None) -> ProjectorLoras:
    """DyPRAG's provider from a saved projector: loaded onto `device`, checked against `model` (`ProjectorError`)."""
    projector = load_projector(folder, device=device)
    check_projector_fits(projector, model)
    return ProjectorLoras(projector, model, tokenizer, top_k, combination)
