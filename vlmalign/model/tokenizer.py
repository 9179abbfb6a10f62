"""Tokenizers: a pretrained one for real models, or a word-level one built locally for tiny models."""

from __future__ import annotations

import re
from pathlib import Path

from vlmalign.config import TokenizerConfig
from vlmalign.errors import ConfigError

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
# Words: runs of letters/digits; punctuation: one token per character.
_WORD_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def corpus_words(paths: list[str | Path]) -> list[str]:
    """Sorted distinct lowercase words and punctuation marks found in the given text files."""
    words: set[str] = set()
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"model.tokenizer.word_corpus: file not found: {path}")
        words.update(_WORD_RE.findall(path.read_text(errors="replace").lower()))
    return sorted(words)


def build_word_tokenizer(words: list[str]):
    """A deterministic word-level tokenizer (lowercasing) over `words` plus the special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(_WORD_RE.pattern), behavior="isolated")]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def load_tokenizer(cfg: TokenizerConfig, llm_pretrained: str | None):
    """Pretrained tokenizer when one is named (or the LLM is pretrained), else a word-level one
    built from `cfg.word_corpus` alone (the benchmark's own files), so that editing a packaged prompt
    changes no tiny model's vocabulary or initialisation; prompt words outside it read as <unk>."""
    name = cfg.pretrained or llm_pretrained
    if name:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)
        if tokenizer.pad_token is None:  # LLaMA ships without one; LLaVA pads with unk
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        return tokenizer
    if not cfg.word_corpus:
        raise ConfigError("model.tokenizer: give `pretrained` or a `word_corpus` to build a word-level tokenizer from")
    return build_word_tokenizer(corpus_words(cfg.word_corpus))
