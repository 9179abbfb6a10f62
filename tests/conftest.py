import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"


@pytest.fixture
def fixtures() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"third-party fixtures not found at {FIXTURES} (CI clones shared/ beside the repo)")
    return FIXTURES


@pytest.fixture
def word_corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("what colour is the red blue green square circle ? it moves left right up down . "
                    "describe video a an appears and then how many objects one two")
    return path


def tiny_model_overrides(corpus: Path, **extra) -> list[str]:
    out = [f"model.tokenizer.word_corpus=[{corpus}]"]
    out += [f"{k}={v}" for k, v in extra.items()]
    return out
