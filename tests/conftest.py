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


def check_shared_prompt_forward(model, visual, requests) -> None:
    """GRPO's training forward with each prompt run once for all its answers gives the log-probs,
    entropies and gradients that full rows (prompt + answer each) give, and the log-probs sampling
    recorded; over a chunk that starts and ends inside a group, as a mini-batch may."""
    import dataclasses

    import torch

    from vlmalign.data.collate import Collator
    from vlmalign.feedback.preferences import Question
    from vlmalign.model.generation import GenerationConfig, sample_answers
    from vlmalign.train.grpo_rank import _answer_logps

    gen = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=1.5, num_return_sequences=3)
    groups = sample_answers(model.eval(), visual, requests, gen, generator=torch.Generator().manual_seed(0))
    questions = [Question(str(i), video, text) for i, (video, text) in enumerate(requests)]
    # answers of several lengths, so padding is exercised: an untrained model seldom ends one itself,
    # and a cut answer's tokens keep their recorded log-probs
    cut = [dataclasses.replace(s, token_ids=s.token_ids[: 2 + k % 5], token_logps=s.token_logps[: 2 + k % 5])
           for k, s in enumerate(s for group in groups for s in group)]
    chunk = [(questions[k // gen.num_return_sequences], s) for k, s in enumerate(cut)][1:-1]
    collate = Collator(model, visual)
    results = []
    for shared in (True, False):
        model.zero_grad()
        logps, mask, entropy = _answer_logps(model, chunk, collate, "cpu", True, shared)
        (logps.sum() + entropy.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logps[mask], entropy[mask], grads))
    (logps, entropy, grads), (full_logps, full_entropy, full_grads) = results
    assert logps.numel() == sum(len(s.token_ids) for _, s in chunk)
    torch.testing.assert_close(logps, full_logps, rtol=0, atol=2e-5)
    torch.testing.assert_close(logps, torch.tensor([x for _, s in chunk for x in s.token_logps]), rtol=0, atol=2e-4)
    torch.testing.assert_close(entropy, full_entropy, rtol=0, atol=2e-5)
    assert grads and grads.keys() == full_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], full_grads[name], rtol=1e-4, atol=1e-5, msg=name)
