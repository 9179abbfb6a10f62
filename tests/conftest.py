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


@pytest.fixture(scope="session")
def tiny_bench(tmp_path_factory) -> Path:
    """A 12-video synthetic benchmark shared by the training tests."""
    from vlmalign.data.synthetic import generate_benchmark

    out = tmp_path_factory.mktemp("bench")
    generate_benchmark(out, num_videos=12, seed=0, progress=False)
    return out


def sft_overrides(bench: Path, run_dir: Path, **extra) -> list[str]:
    """Tiny-config overrides pointing SFT at a benchmark folder and a run dir."""
    base = {
        "run.dir": str(run_dir),
        "run.progress": "false",
        "data.train": f"[{bench}/sft_easy.json, {bench}/sft_hard.json]",
        "data.feature_cache": str(run_dir.parent / "feature_cache"),
        "model.tokenizer.word_corpus": f"[{bench}/sft_mix.json, {bench}/judge_train.json]",
        "curriculum.epochs_per_stage": "1",
        "train.batch_size": "8",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def tiny_policy(tiny_bench, tmp_path_factory) -> Path:
    """A saved, untrained tiny model built from configs/tiny/sft.yaml with the benchmark's words:
    the starting policy (and reference, reward-model backbone) of the stage tests. Read-only."""
    import torch

    from vlmalign.config import SFTConfig, load_config
    from vlmalign.model.policy import build_model

    out = tmp_path_factory.mktemp("policy")
    torch.manual_seed(0)
    cfg = load_config(SFTConfig, str(REPO / "configs" / "tiny" / "sft.yaml"), sft_overrides(tiny_bench, out / "unused"))
    build_model(cfg.model).save_pretrained(out / "init")
    return out / "init"


@pytest.fixture
def kill_at_step(monkeypatch):
    """kill_at_step(n): the n-th AdamW step raises KeyboardInterrupt, as if the run were killed
    there; `monkeypatch.undo()` then lets the test resume it."""
    import torch

    def arm(n: int) -> None:
        real_step, calls = torch.optim.AdamW.step, {"n": 0}

        def step(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return real_step(self, *a, **k)

        monkeypatch.setattr(torch.optim.AdamW, "step", step)

    return arm


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train several times faster on one thread when the cores are shared; a module
    opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
