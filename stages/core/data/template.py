"""Prompt templates: turn a conversation into (prompt ids, response ids) pairs.

A template encodes each user turn and each assistant turn separately, so the
preprocessing knows exactly which tokens are prompt (no loss) and which are response
(loss). Two kinds exist behind one interface:
- named templates (default, alpaca, vicuna, chatml, llama3, empty): format strings;
- `auto`: the tokenizer's own Jinja chat template, rendered turn by turn; the rendering
  must grow by appending (true for the usual chat templates), which is checked. An answer
  ends with the eos that closes it (text the template adds after it goes to the next turn).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Messages = list[dict[str, str]]
Pairs = list[tuple[list[int], list[int]]]


class Template(Protocol):
    name: str

    def encode_multiturn(self, tokenizer: PreTrainedTokenizerBase, messages: Messages, system: str) -> Pairs:
        """Token ids per (user, assistant) pair; an odd final user turn gets an empty response."""


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


@dataclass(frozen=True)
class FormatTemplate:
    """A template written as format strings; `{content}` is the message text."""

    name: str
    user: str
    assistant: str = "{content}"
    system: str = "{content}\n"
    default_system: str = ""
    separator: str = ""
    end: str | None = None  # text closing an assistant turn; None: the tokenizer's eos token
    add_bos: bool = True

    def check(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if self.end is None and tokenizer.eos_token is None:
            raise UserError(f"template {self.name!r} ends answers with the eos token, but the tokenizer has none; "
                            f"set eos_token in the tokenizer config or use --template auto.")
        if self.end and len(_ids(tokenizer, self.end)) != 1:
            raise UserError(f"template {self.name!r} needs {self.end!r} as a single token of the tokenizer; "
                            f"use --template auto (the tokenizer's own chat template) or default.")

    def encode_multiturn(self, tokenizer: PreTrainedTokenizerBase, messages: Messages, system: str) -> Pairs:
        end = tokenizer.eos_token if self.end is None else self.end
        pairs = []
        for index in range(0, len(messages), 2):
            prompt = ""
            if index == 0:
                if self.add_bos and tokenizer.bos_token:
                    prompt += tokenizer.bos_token
                if system or self.default_system:
                    prompt += self.system.format(content=system or self.default_system)
            else:
                prompt += self.separator
            prompt += self.user.format(content=messages[index]["content"])
            response = ""
            if index + 1 < len(messages):
                response = self.assistant.format(content=messages[index + 1]["content"]) + end
            pairs.append((_ids(tokenizer, prompt), _ids(tokenizer, response)))
        return pairs


@dataclass(frozen=True)
class ChatTemplate:
    """The tokenizer's own `chat_template`, rendered incrementally turn by turn."""

    name: str = "auto"

    def _render(self, tokenizer: PreTrainedTokenizerBase, messages: Messages, generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as err:  # jinja raises its own errors (e.g. "system role not supported")
            raise UserError(f"the tokenizer's chat template failed ({err}); use a named --template instead.") from None

    def encode_multiturn(self, tokenizer: PreTrainedTokenizerBase, messages: Messages, system: str) -> Pairs:
        head = [{"role": "system", "content": system}] if system else []
        pairs, rendered = [], ""
        for index in range(0, len(messages), 2):
            prompt_text = self._render(tokenizer, head + messages[: index + 1], generation_prompt=True)
            response_text = prompt_text
            if index + 1 < len(messages):
                response_text = self._render(tokenizer, head + messages[: index + 2], generation_prompt=False)
            if not (prompt_text.startswith(rendered) and response_text.startswith(prompt_text)):
                raise UserError("the tokenizer's chat template does not render conversations by appending turns, "
                                "so prompt and answer tokens cannot be told apart; use a named --template.")
            answer = response_text[len(prompt_text):]
            # What a template writes after the eos that closes an answer (ChatML's newline) is never
            # generated (generation stops at the eos): it opens the next turn, or ends the text unlearnt.
            end = answer.rfind(tokenizer.eos_token) if tokenizer.eos_token else -1
            if end >= 0:
                answer = answer[:end + len(tokenizer.eos_token)]
            pairs.append((_ids(tokenizer, prompt_text[len(rendered):]), _ids(tokenizer, answer)))
            rendered = prompt_text + answer
        return pairs


TEMPLATES: dict[str, FormatTemplate] = {
    t.name: t
    for t in (
        FormatTemplate("default", user="Human: {content}\nAssistant: ", system="System: {content}\n",
                       separator="\n"),
        FormatTemplate(
            "alpaca", user="### Instruction:\n{content}\n\n### Response:\n", system="{content}\n\n",
            default_system="Below is an instruction that describes a task. "
                           "Write a response that appropriately completes the request.",
            separator="\n\n"),
        FormatTemplate(
            "vicuna", user="USER: {content} ASSISTANT: ", system="{content} ",
            default_system="A chat between a curious user and an artificial intelligence assistant. "
                           "The assistant gives helpful, detailed, and polite answers to the user's questions."),
        FormatTemplate("chatml", user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
                       system="<|im_start|>system\n{content}<|im_end|>\n", end="<|im_end|>", separator="\n",
                       add_bos=False),
        FormatTemplate("llama3",
                       user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
                            "<|start_header_id|>assistant<|end_header_id|>\n\n",
                       system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
                       end="<|eot_id|>"),
        FormatTemplate("empty", user="{content}", system="", add_bos=False),
    )
}


def get_template(tokenizer: PreTrainedTokenizerBase, name: str | None) -> Template:
    """Resolve `--template`: a named template, or `auto`/None for the tokenizer's chat template."""
    if name in (None, "auto"):
        if getattr(tokenizer, "chat_template", None):
            return ChatTemplate()
        return TEMPLATES["default"]
    if name not in TEMPLATES:
        raise UserError(f"--template {name!r} is unknown; use auto or one of {', '.join(TEMPLATES)}.")
    template = TEMPLATES[name]
    template.check(tokenizer)
    return template
