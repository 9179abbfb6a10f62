"""Answering questions about videos with a policy (either family): batched, greedy or sampled, G
answers per prompt.

Decoding is our own short loop rather than `transformers.generate`, for two reasons the feedback
stages need: the prompt (system text + a few hundred visual tokens) is run once and its KV cache is
copied to the G samples of that prompt, where `generate(num_return_sequences=G)` would run G
identical prefills; and every sampled token's log-probability under the policy is recorded.

Recorded log-probs are the model's own (temperature 1, no top-p truncation): log pi(y_t | x, y_<t).
They are what DPO, PPO and GRPO call the sequence log-prob, whatever temperature was used to pick
the tokens.
"""

from __future__ import annotations

import inspect

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from vlmalign.data.collate import pad_sequences
from vlmalign.data.formats import VIDEO_TOKEN
from vlmalign.data.template import IGNORE_INDEX
from vlmalign.errors import VlmalignError


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_return_sequences: int = 1
    batch_size: int = 8  # prompts per forward pass (each with its G samples)


@dataclass
class Sample:
    """One generated answer: its text, token ids (up to and including EOS if it ended) and log-probs."""

    text: str
    token_ids: list[int]
    token_logps: list[float]
    finished: bool  # ended with EOS rather than at max_new_tokens

    @property
    def logp(self) -> float:
        return float(sum(self.token_logps))


def left_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of left-padded rows, counting from their first real token, as in training (right
    padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _pick(logits: torch.Tensor, gen: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    if not gen.do_sample:
        return logits.argmax(-1)
    logits = logits / max(gen.temperature, 1e-5)
    if gen.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the best token always stays)
        drop = probs.cumsum(-1) - probs >= gen.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def cache_name(model) -> str:
    """What a transformers model's forward calls its KV cache: `cache` in recent transformers 5.x,
    where the older `past_key_values` still works but warns on every call; `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@dataclass
class DecodeState:
    """What decoding carries from step to step: the KV cache and each row's next position."""

    cache: object
    position: torch.Tensor  # [rows]

    def repeat(self, g: int) -> None:
        """Each row becomes g rows (its samples), sharing the prefilled prefix."""
        self.cache.batch_repeat_interleave(g)
        self.position = self.position.repeat_interleave(g)

    def select(self, rows: torch.Tensor) -> None:
        """Row i becomes prefilled row rows[i]: any number of answers per prompt."""
        self.cache.batch_select_indices(rows)
        self.position = self.position[rows]

    def next_positions(self, n: int) -> torch.Tensor:
        """[rows, n]: the positions of the next n tokens of each row."""
        return self.position[:, None] + torch.arange(n, device=self.position.device)

    def step(self, lm, tokens: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """`tokens` [rows, n] through `lm` (a transformers causal LM) on the cache: their logits
        [rows, n, vocab]; the state moves n positions on. Each family gives its positions."""
        name = cache_name(lm)
        out = lm(input_ids=tokens, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                 **{name: self.cache})
        self.cache, self.position = getattr(out, name), self.position + tokens.shape[1]
        return out.logits


@torch.no_grad()
def sample_tokens(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, visual: dict, gen: GenerationConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode G continuations of each left-padded prompt from one shared prefill (`model.prefill`,
    then `model.decode` per token; `visual` is `model.stack_visual` of the rows that have a video).
    Tokens in `model.unsampled_token_ids` (a video model's vision markers) are never picked.

    Returns (tokens [B*G, N], token log-probs [B*G, N], lengths [B*G]); rows are prompt-major
    (the G samples of prompt 0 first). Positions after a row's EOS hold pad / 0.
    """
    tokenizer, g = model.tokenizer, gen.num_return_sequences
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    logits, state = model.prefill(input_ids, attention_mask, visual)
    # prompts of one length need no mask while decoding (each new token sees the whole cache), and
    # building one every step costs a small model more than the step's attention
    padded = not bool(attention_mask.all())
    if g > 1:
        state.repeat(g)
        attention_mask = attention_mask.repeat_interleave(g, 0)
        logits = logits.repeat_interleave(g, 0)
    rows = logits.shape[0]
    finished = torch.zeros(rows, dtype=torch.bool, device=logits.device)
    tokens, logps = [], []
    never = torch.tensor(model.unsampled_token_ids, dtype=torch.long, device=logits.device)
    for _ in range(gen.max_new_tokens):
        logp_all = logits.float().log_softmax(-1)  # the policy's own log-probs, recorded as they are
        nxt = _pick(logits.float().index_fill(-1, never, float("-inf")), gen, generator)
        logp = logp_all.gather(-1, nxt[:, None]).squeeze(-1)
        nxt = nxt.masked_fill(finished, pad)
        tokens.append(nxt)
        logps.append(logp.masked_fill(finished, 0.0))
        finished = finished | (nxt == eos)
        if bool(finished.all()):
            break
        if padded:
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        logits = model.extend(nxt[:, None], attention_mask if padded else None, state)[:, -1]
    tokens_t = torch.stack(tokens, 1)
    logps_t = torch.stack(logps, 1)
    # length = tokens up to and including EOS, or all of them when the row never ended
    is_eos = tokens_t == eos
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(is_eos[:, 0], tokens_t.shape[1], dtype=torch.long))
    return tokens_t, logps_t, first_eos


def _prompt_batch(model, questions: list[str], visual_inputs: list):
    """Left-padded prompt ids, mask and the stacked visual inputs of the rows that have a video."""
    prompts, visual_rows = [], []
    for question, visual in zip(questions, visual_inputs):
        if visual is not None and VIDEO_TOKEN not in question:
            question = f"{VIDEO_TOKEN}\n{question}"
        prompts.append(model.encode_prompt(question, model.inputs_layout(visual) if visual is not None else None))
        if visual is not None:
            visual_rows.append(visual)
    input_ids = pad_sequences(prompts, model.tokenizer.pad_token_id, side="left").to(model.device)
    attention = pad_sequences([[1] * len(p) for p in prompts], 0, side="left").to(model.device)
    stacked = {k: v.to(model.device) for k, v in model.stack_visual(visual_rows).items()} if visual_rows else {}
    return input_ids, attention, stacked


def answer_logits(model, questions: list[str], visual_inputs: list, answers: list[list[int]],
                  prompt_of: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced logits of answers, the training twin of `sample_tokens`: each prompt
    (`questions[i]` with `visual_inputs[i]`, as `sample_from_visual` takes them) is prefilled once
    and its keys and values serve every answer to it, with gradients; answer r answers prompt
    `prompt_of[r]`. The G answers of a GRPO group then cost one prompt, not G: with a video prompt
    of hundreds of tokens and short answers, most of a full forward pass.

    Returns (logits [R, N + 1, vocab], labels [R, N + 1]) laid out like a full forward pass for
    `losses.token_logps`: position t predicts label t + 1; label 0 and padding are ignored.
    Gradient checkpointing drops the cache a prefill makes, so it cannot run this way.
    """
    input_ids, attention, visual = _prompt_batch(model, questions, visual_inputs)
    last, state = model.prefill(input_ids, attention, visual)
    if state.cache is None:
        raise VlmalignError("shared-prompt forward: the model returned no KV cache (gradient checkpointing drops "
                            "it while training); run the full rows instead")
    rows = torch.tensor(prompt_of, device=input_ids.device)
    state.select(rows)
    ids = pad_sequences(answers, model.tokenizer.pad_token_id, side="right").to(input_ids.device)
    seen = pad_sequences([[1] * len(a) for a in answers], 0, side="right").to(input_ids.device)
    logits = model.extend(ids, torch.cat([attention[rows], seen], 1), state)
    labels = torch.cat([torch.full_like(ids[:, :1], IGNORE_INDEX), ids.masked_fill(seen == 0, IGNORE_INDEX)], 1)
    return torch.cat([last[rows][:, None], logits], 1), labels


def sample_from_visual(
    model, questions: list[str], visual_inputs: list[torch.Tensor | None], gen: GenerationConfig,
    progress: bool = False, generator: torch.Generator | None = None,
) -> list[list[Sample]]:
    """Like `sample_answers`, for visual inputs already in hand (e.g. the frames of one clip).

    `visual_inputs[i]` is what the policy's visual inputs `.get` for question i's video, or None.
    """
    tokenizer, eos = model.tokenizer, model.tokenizer.eos_token_id
    g = gen.num_return_sequences
    results: list[list[Sample]] = []
    bar = tqdm(total=len(questions), desc="generate", disable=not progress, unit="q")
    for start in range(0, len(questions), gen.batch_size):
        end = start + gen.batch_size
        batch = _prompt_batch(model, questions[start:end], visual_inputs[start:end])
        tokens, logps, lengths = sample_tokens(model, *batch, gen, generator)
        samples = []
        for row in range(tokens.shape[0]):
            n = int(lengths[row])
            ids = tokens[row, :n].tolist()
            finished = bool(n and ids[-1] == eos)
            text = tokenizer.decode(ids[:-1] if finished else ids, skip_special_tokens=True).strip()
            samples.append(Sample(text, ids, logps[row, :n].tolist(), finished))
        results += [samples[i * g : (i + 1) * g] for i in range(len(samples) // g)]
        bar.update(len(samples) // g)
    bar.close()
    return results


def sample_answers(
    model, visual, requests: list[tuple[str | list[str] | None, str]], gen: GenerationConfig,
    progress: bool = False, generator: torch.Generator | None = None,
) -> list[list[Sample]]:
    """For each (video, question), `gen.num_return_sequences` samples with their log-probs.

    The question gets a `<video>` placeholder at its start when it has none and a video is given.
    Visual inputs are fetched a batch at a time, so a long request list never holds them all.
    """
    results: list[list[Sample]] = []
    bar = tqdm(total=len(requests), desc="generate", disable=not progress, unit="q")
    for start in range(0, len(requests), gen.batch_size):
        chunk = requests[start : start + gen.batch_size]
        inputs = [visual.get(video) if video is not None else None for video, _ in chunk]
        results += sample_from_visual(model, [q for _, q in chunk], inputs, gen, generator=generator)
        bar.update(len(chunk))
    bar.close()
    return results


def generate_answers(
    model, visual, requests: list[tuple[str | list[str] | None, str]], gen: GenerationConfig,
    progress: bool = False, seed: int | None = None,
) -> list[list[str]]:
    """For each (video, question), `gen.num_return_sequences` answer texts (decoded, stripped);
    with `seed`, sampled answers are the same on every run."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    return [[s.text for s in group] for group in sample_answers(model, visual, requests, gen, progress, generator)]
