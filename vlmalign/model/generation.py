"""Answering questions about videos with a VideoLM: batched, greedy or sampled, G answers per prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from vlmalign.data.collate import pad_sequences
from vlmalign.data.features import VisualInputs
from vlmalign.data.formats import VIDEO_TOKEN
from vlmalign.data.template import encode_prompt


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_return_sequences: int = 1
    batch_size: int = 8


def generate_answers(
    model, visual: VisualInputs, requests: list[tuple[str | list[str] | None, str]], gen: GenerationConfig, progress: bool = False
) -> list[list[str]]:
    """For each (video, question), `gen.num_return_sequences` answers (decoded, stripped).

    The question gets a `<video>` placeholder at its start when it has none and a video is given.
    """
    tokenizer = model.tokenizer
    answers: list[list[str]] = []
    bar = tqdm(total=len(requests), desc="generate", disable=not progress, unit="q")
    for start in range(0, len(requests), gen.batch_size):
        chunk = requests[start : start + gen.batch_size]
        prompts, videos = [], []
        for video, question in chunk:
            if video is not None and VIDEO_TOKEN not in question:
                question = f"{VIDEO_TOKEN}\n{question}"
            prompts.append(encode_prompt(tokenizer, question, model.num_visual_tokens))
            if video is not None:
                videos.append(video)
        input_ids = pad_sequences(prompts, tokenizer.pad_token_id, side="left").to(model.device)
        attention = pad_sequences([[1] * len(p) for p in prompts], 0, side="left").to(model.device)
        features = None
        if videos:
            visual_in = [visual.get(v) for v in videos]
            stacked = torch.stack(visual_in).to(model.device)
            features = stacked if visual.use_features else model.video_features(stacked)
        kwargs = {"max_new_tokens": gen.max_new_tokens, "num_return_sequences": gen.num_return_sequences}
        if gen.do_sample:
            kwargs.update(do_sample=True, temperature=gen.temperature, top_p=gen.top_p)
        else:
            kwargs.update(do_sample=False)
        out = model.generate(input_ids, attention, features, **kwargs)
        texts = tokenizer.batch_decode(out, skip_special_tokens=True)
        g = gen.num_return_sequences
        answers += [[t.strip() for t in texts[i * g : (i + 1) * g]] for i in range(len(chunk))]
        bar.update(len(chunk))
    bar.close()
    return answers
