"""The prompt shapes of the original PRAG/DyPRAG code, kept word for word.

Question answering (PRAG `src/prompt_template.py`): one user turn, rendered with the
tokenizer's chat template, then the start of the assistant turn written by us:

    user:      "You should answer the question by referring to the knowledge provided below and
                integrating your own knowledge.\\n" + "Passage 1: ...\\nPassage 2: ...\\n" + "\\n\\nQuestion: Q?"
    assistant: "The answer is " (+ the answer and "." when the prompt is a training text)

Chain-of-thought puts few-shot examples ("Question: q\\nAnswer: a\\n\\n" each) and "Let's think
step by step." in the user turn and starts the assistant turn with "Answer: ". Without passages
the knowledge block is simply empty, as in the original (the instruction sentence stays).
The same function builds training texts (PRAG encoding: answer given) and inference prompts
(answer None), so the LoRAs are trained on exactly the shape they are queried with.

Augmentation (PRAG `src/augment.py`): `REWRITE_PROMPT` asks for one rewrite of a passage,
`QA_PROMPT` for a JSON list of {question, answer, full_answer}; both are sent as a single
user turn through the chat template.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

USER_PROMPT = ("You should answer the question by referring to the knowledge provided below and integrating your "
               "own knowledge.\n{passages}\n\nQuestion: {question}")
USER_PROMPT_WITH_COT = ("You should reference the knowledge provided below and combine it with your own knowledge to "
                        "answer the question. Please follow the format of the example I provided above.\n"
                        "Here are some examples about how to answer the questions.\n{fewshot}"
                        "Here are some reference.\n{passages}\n\n"
                        "Let's think step by step. Answer the questions in the same format as above.\n"
                        "Question: {question}")
ASSISTANT_PROMPT = "The answer is {answer}"
ASSISTANT_PROMPT_WITH_COT = "Answer: {answer}"

REWRITE_PROMPT = ("Rewrite the following passage. While keeping the entities, proper nouns, and key details such as "
                  "names, locations, and terminology intact, create a new version of the text that expresses the "
                  "same ideas in a different way. Make sure the revised passage is distinct from the original one, "
                  "but preserves the core meaning and relevant information.\n{passage}")
# The original's example object lacks the comma after "Paris"; kept, since the models were
# prompted with exactly this text (our parser is lenient about what comes back, not about this).
QA_PROMPT = ("I will provide a passage of text, and you need to generate three different questions based on the "
             "content of this passage. Each question should be answerable using the information provided in the "
             "passage. Additionally, please provide an appropriate answer for each question derived from the "
             "passage.\n"
             "You need to generate the question and answer in the following format:\n"
             "[\n"
             "    {{\n"
             "        \"question\": \"What is the capital of France?\",\n"
             "        \"answer\": \"Paris\"\n"
             "        \"full_answer\": \"The capital of France is Paris.\"\n"
             "    }}, \n"
             "]\n\n"
             "This list should have at least three elements. You only need to output this list in the above format.\n"
             "Passage:\n"
             "{passage}")


def format_fewshot(examples: Sequence[dict[str, str]]) -> str:
    """Few-shot block of the chain-of-thought prompt: "Question: q\\nAnswer: a\\n\\n" per example."""
    return "".join(f"Question: {ex['question']}\nAnswer: {ex['answer']}\n\n" for ex in examples)


def read_fewshot(path: str) -> str:
    """The few-shot block of a `--fewshot_file` (a JSON list of {question, answer} objects).

    A file that cannot be read or has another shape is a `RecordError` that names it.
    """
    from .records import RecordError

    try:
        examples = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # ValueError: not UTF-8, or not JSON
        raise RecordError(f"{path} could not be read as JSON ({err}).") from None
    if not isinstance(examples, list) or not all(isinstance(e, dict) and {"question", "answer"} <= e.keys()
                                                  for e in examples):
        raise RecordError(f"{path} must be a JSON list of {{question, answer}} objects.")
    return format_fewshot(examples)


def _normalise_question(question: str) -> str:
    # As the original: always end with "?", and glue a detached " ?" to the last word.
    question = question.strip()
    if not question.endswith("?"):
        return question + "?"
    if question.endswith(" ?"):
        return question[:-1].strip() + "?"
    return question


def qa_turns(question: str, passages: Sequence[str] | None = None, answer: str | None = None,
             with_cot: bool = False, fewshot: str | None = None) -> tuple[str, str]:
    """(user message, start of the assistant message) of the original QA prompt.

    `answer` None gives the inference prompt (the assistant text ends with "The answer is " /
    "Answer: "); an answer is stripped and closed with "." as in the original training texts.
    """
    if with_cot and fewshot is None:
        raise ValueError("the chain-of-thought prompt needs few-shot examples (format_fewshot)")
    question = _normalise_question(question)
    contexts = "".join(f"Passage {i + 1}: {passage}\n" for i, passage in enumerate(passages or []))
    answer = "" if answer is None else answer.strip()
    if answer and not answer.endswith("."):
        answer += "."
    if with_cot:
        user = USER_PROMPT_WITH_COT.format(question=question, passages=contexts, fewshot=fewshot)
        return user, ASSISTANT_PROMPT_WITH_COT.format(answer=answer)
    return USER_PROMPT.format(question=question, passages=contexts), ASSISTANT_PROMPT.format(answer=answer)


def chat_prefix(tokenizer: PreTrainedTokenizerBase, user: str) -> str:
    """The chat-template rendering of one user turn plus the assistant header (as text).

    Tokenizers without a chat template (base models) get the user text and a newline.
    """
    if not getattr(tokenizer, "chat_template", None):
        return user + "\n"
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                         tokenize=False)


def get_prompt(tokenizer: PreTrainedTokenizerBase, question: str, passages: Sequence[str] | None = None,
               answer: str | None = None, with_cot: bool = False, fewshot: str | None = None) -> list[int]:
    """Token ids of the original QA prompt (PRAG's `get_prompt`): chat-rendered user turn, then
    the assistant start (and answer) encoded without special tokens.

    The rendered chat text carries its own bos, so it is encoded with add_special_tokens=False
    (no doubled bos on Llama-3-style tokenizers). One deliberate difference from the original:
    an inference prompt ends with "The answer is" without the trailing space, because training
    texts tokenize "is Paris" as "is" + " Paris"; a lone space token at the end of the prompt
    is a token sequence the model never saw before an answer.
    """
    user, assistant = qa_turns(question, passages, answer, with_cot, fewshot)
    if answer is None:
        assistant = assistant.rstrip()
    ids = tokenizer.encode(chat_prefix(tokenizer, user), add_special_tokens=False)
    return ids + tokenizer.encode(assistant, add_special_tokens=False)
