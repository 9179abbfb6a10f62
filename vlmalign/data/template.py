"""The `vicuna_v1` conversation template (LLaVA-1.5 / VLM-RLAIF) and tokenisation with visual slots.

Layout: `<s>{system} USER: <video>\n{question} ASSISTANT: {answer}</s>USER: ... ASSISTANT: ...</s>`.
The `<video>` placeholder becomes `num_visual_tokens` slots holding `VISUAL_TOKEN_ID`; the model
writes visual embeddings into them. Labels are -100 everywhere but the answers and their `</s>`.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmalign.data.formats import VIDEO_TOKEN
from vlmalign.errors import DataError

VISUAL_TOKEN_ID = -200  # never a vocabulary id; replaced by visual embeddings before the LLM sees it
IGNORE_INDEX = -100
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


def _text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids if text else []


def _user_ids(tokenizer, text: str, num_visual_tokens: int) -> list[int]:
    """Token ids of a user turn's text with the placeholder expanded into visual slots."""
    if VIDEO_TOKEN not in text:
        return _text_ids(tokenizer, text)
    before, after = text.split(VIDEO_TOKEN, 1)
    return _text_ids(tokenizer, before) + [VISUAL_TOKEN_ID] * num_visual_tokens + _text_ids(tokenizer, after)


def encode_conversation(
    tokenizer, turns: list, num_visual_tokens: int, max_length: int, sample_id: str = "", system: str = VICUNA_V1_SYSTEM
) -> Encoded:
    """Tokenise alternating user/assistant `turns` (objects with .role and .text) for training.

    A prompt that does not fit in `max_length` with its visual tokens is an error (visual tokens are
    never truncated); an answer that runs past it is cut at `max_length`.
    """
    input_ids = [tokenizer.bos_token_id]
    labels = [IGNORE_INDEX]
    for i in range(0, len(turns), 2):
        user, assistant = turns[i], turns[i + 1]
        prefix = f"{system} USER: " if i == 0 else "USER: "
        prompt = _user_ids(tokenizer, prefix + user.text + " ASSISTANT:", num_visual_tokens)
        input_ids += prompt
        labels += [IGNORE_INDEX] * len(prompt)
        if len(input_ids) >= max_length:
            if i == 0:
                raise DataError(
                    f"sample {sample_id!r}: the prompt needs {len(input_ids)} tokens ({num_visual_tokens} visual) "
                    f"but data.max_length is {max_length}; raise max_length or use fewer frames"
                )
            break
        answer = _text_ids(tokenizer, " " + assistant.text) + [tokenizer.eos_token_id]
        input_ids += answer
        labels += answer
    return Encoded(input_ids[:max_length], labels[:max_length])


def encode_prompt(tokenizer, question: str, num_visual_tokens: int, system: str = VICUNA_V1_SYSTEM) -> list[int]:
    """Ids of a single-turn generation prompt, ending with `ASSISTANT:`."""
    return [tokenizer.bos_token_id] + _user_ids(tokenizer, f"{system} USER: {question} ASSISTANT:", num_visual_tokens)
