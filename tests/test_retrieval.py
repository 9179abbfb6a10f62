"""CLIP-score retrieval and action recognition (`vlmalign eval retrieval | action`)."""

import json

import numpy as np
import pytest
import torch

from tests.conftest import REPO, sft_overrides
from vlmalign.cli import main
from vlmalign.errors import DataError, VlmalignError
from vlmalign.eval.compare import compare_reports
from vlmalign.eval.retrieval import (
    evaluate_action,
    evaluate_retrieval,
    rank_metrics,
    read_classes,
    read_retrieval,
    target_ranks,
    text_encoder_source,
)

TINY_VISION = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                   patch_size=8)  # configs/tiny/model.yaml


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """80 videos: 8 in the test split, so ranks can differ from 1."""
    from vlmalign.data.synthetic import generate_benchmark

    out = tmp_path_factory.mktemp("bench")
    generate_benchmark(out, num_videos=80, seed=1, progress=False)
    return out


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random-initialised CLIP (text and vision towers) with a character-level BPE tokenizer, saved
    the way hub checkpoints are: what `--text-encoder` and `vision.pretrained` load. 512 positions, so
    character-level captions are not truncated."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    out = tmp_path_factory.mktemp("clip")
    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"))
    torch.manual_seed(0)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=512, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"], projection_dim=16)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=dict(TINY_VISION, projection_dim=16), projection_dim=16))
    model.save_pretrained(out / "ckpt")
    tokenizer.save_pretrained(out / "ckpt")
    return out / "ckpt"


def test_ranks_hand_computed_ties_count_against_the_target():
    sim = [[0.9, 0.1, 0.5, 0.2],
           [0.3, 0.3, 0.8, 0.3],
           [0.4, 0.4, 0.4, 0.4]]
    # row 0: target col 0 (0.9) is best -> 1; row 1: targets {0, 1} best 0.3, beaten by 0.8 and tied by
    # col 3 -> 3; row 2: everything ties with target col 3 -> 4
    ranks = target_ranks(sim, [[0], [0, 1], [3]])
    assert ranks == [1, 3, 4]
    m = rank_metrics(ranks, ks=(1, 3))
    assert m == {"n": 3, "R@1": pytest.approx(1 / 3), "R@3": pytest.approx(2 / 3), "median_rank": 3,
                 "mean_rank": pytest.approx(8 / 3)}
    assert rank_metrics([1, 2, 6, 10])["median_rank"] == 4  # even count: the middle two averaged


def _independent_ranks(a: np.ndarray, b: np.ndarray, target: list[int]) -> list[int]:
    """Ranks by sorting: the usual implementation, exact when no similarities tie."""
    sim = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    return [int(np.where(np.argsort(-row, kind="stable") == t)[0][0]) + 1 for row, t in zip(sim, target)]


def test_retrieval_matches_an_independent_ranking(clip_dir, bench, tmp_path):
    from transformers import AutoTokenizer, CLIPModel

    rows = json.loads((bench / "retrieval_test.json").read_text())
    # The "model" describes video 0 with its caption and the others with the next one's (the last
    # with video 1's): no two descriptions are equal, so sorting and our tie rule agree.
    n = len(rows)
    preds = [rows[0]["caption"]] + [rows[1 + i % (n - 1)]["caption"] for i in range(1, n)]
    path = tmp_path / "preds.json"
    path.write_text(json.dumps([dict(r, pred=p) for r, p in zip(rows, preds)]))
    report = evaluate_retrieval(tmp_path / "out", path, predictions=True, text_encoder=str(clip_dir), progress=False)

    clip, tok = CLIPModel.from_pretrained(clip_dir).eval(), AutoTokenizer.from_pretrained(clip_dir)
    with torch.no_grad():
        embed = lambda texts: clip.get_text_features(**tok(texts, padding=True, return_tensors="pt")).pooler_output.numpy()  # noqa: E731
        p, c = embed(preds), embed([r["caption"] for r in rows])
    v2t = _independent_ranks(p, c, list(range(len(rows))))
    t2v = _independent_ranks(c, p, list(range(len(rows))))
    for name, ranks in (("video_to_text", v2t), ("text_to_video", t2v)):
        got = report["results"][name]
        assert got["R@1"] == pytest.approx(np.mean(np.array(ranks) <= 1)), name
        assert got["R@5"] == pytest.approx(np.mean(np.array(ranks) <= 5)), name
        assert got["mean_rank"] == pytest.approx(np.mean(ranks)), name
    assert v2t[0] == 1 and report["results"]["video_to_text"]["n"] == len(rows)
    assert (tmp_path / "out" / "report.md").read_text().count("| video to text |") == 1

    # Perfect descriptions, side by side with the shifted ones.
    path.write_text(json.dumps([dict(r, pred=r["caption"]) for r in rows]))
    perfect = evaluate_retrieval(tmp_path / "perfect", path, predictions=True, text_encoder=str(clip_dir), progress=False)
    assert perfect["results"]["video_to_text"]["R@1"] == 1.0 and perfect["results"]["text_to_video"]["median_rank"] == 1
    again = evaluate_retrieval(tmp_path / "again", tmp_path / "perfect" / "predictions.jsonl", predictions=True,
                               text_encoder=str(clip_dir), progress=False)  # our output is valid input
    assert again["results"] == perfect["results"]
    table = compare_reports([str(tmp_path / "out"), str(tmp_path / "perfect")])["table"]
    shifted = 100 * report["results"]["video_to_text"]["R@1"]
    assert f"| video_to_text | R@1 % | {shifted:.1f} | 100.0 |" in table


def test_action_top1_and_class_list(clip_dir, bench, tmp_path):
    classes = read_classes(bench / "action_classes.txt")
    assert classes == [f"objects moving {d}" for d in ("left", "right", "up", "down")]
    rows = json.loads((bench / "action_test.json").read_text())
    assert rows, "the benchmark should have a test video moving one way"
    # A description that is the class prompt itself is nearest its class (cosine 1).
    path = tmp_path / "preds.json"
    path.write_text(json.dumps([dict(r, pred=f"a video of {r['label']}.") for r in rows]))
    report = evaluate_action(tmp_path / "out", path, classes=classes, predictions=True, text_encoder=str(clip_dir),
                             progress=False)
    assert report["results"]["all"]["top1"] == 1.0 and report["results"]["all"]["classes"] == 4
    with pytest.raises(DataError, match="not in the class list"):
        evaluate_action(tmp_path / "bad", path, classes=["jumping"], predictions=True, text_encoder=str(clip_dir))


def test_input_formats_and_errors(tmp_path):
    csv = tmp_path / "msrvtt_test.csv"
    csv.write_text("key,vid_key,video_id,sentence\nret0,msr7579,video7579,a girl sings\n"
                   "ret1,msr7579,video7579,someone sings on stage\nret2,msr7725,video7725,a man cooks\n")
    items = read_retrieval(csv)
    assert [(it.video_name, it.texts) for it in items] == [("video7579", ["a girl sings", "someone sings on stage"]),
                                                            ("video7725", ["a man cooks"])]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"video_name": "v1", "captions": []}]))
    with pytest.raises(DataError, match=rf"{bad}:1: field 'captions'"):
        read_retrieval(bad)
    bad.write_text(json.dumps([{"video_name": "v1"}]))
    with pytest.raises(DataError, match=rf"{bad}:1: missing field 'caption'"):
        read_retrieval(bad)
    ind = tmp_path / "classInd.txt"
    ind.write_text("1 ApplyEyeMakeup\n2 ApplyLipstick\n\n")
    assert read_classes(ind) == ["ApplyEyeMakeup", "ApplyLipstick"]
    ind.write_text("run\nrun\n")
    with pytest.raises(DataError, match="listed twice"):
        read_classes(ind)
    with pytest.raises(VlmalignError, match="--text-encoder"):
        text_encoder_source(None, None)


def test_model_describes_and_its_own_clip_text_tower_scores(clip_dir, bench, tmp_path, capsys):
    """A model whose vision tower was loaded from a (local) CLIP checkpoint: the default text tower is
    that checkpoint's; a tower built from a config has none, and the error says what to pass."""
    from vlmalign.config import SFTConfig, load_config
    from vlmalign.model.policy import build_model

    torch.manual_seed(0)
    over = sft_overrides(bench, tmp_path / "unused")
    cfg = load_config(SFTConfig, str(REPO / "configs" / "tiny" / "sft.yaml"), over + [f"model.vision.pretrained={clip_dir}"])
    build_model(cfg.model).save_pretrained(tmp_path / "clip-model")
    assert text_encoder_source(tmp_path / "clip-model", None) == str(clip_dir)
    args = ["--data", str(bench), "--max-new-tokens", "12", "--feature-cache", str(tmp_path / "features")]
    assert main(["eval", "retrieval", "--model", str(tmp_path / "clip-model"), *args]) == 0
    report = json.loads((tmp_path / "eval-retrieval" / "report.json").read_text())
    assert report["text_encoder"] == str(clip_dir) and report["generation"]["generated"] == report["results"]["video_to_text"]["n"]
    assert 0 <= report["results"]["text_to_video"]["R@1"] <= 1
    assert main(["eval", "action", "--model", str(tmp_path / "clip-model"), *args]) == 0
    assert json.loads((tmp_path / "eval-action" / "report.json").read_text())["results"]["all"]["classes"] == 4
    assert "top-1" in capsys.readouterr().out

    cfg = load_config(SFTConfig, str(REPO / "configs" / "tiny" / "sft.yaml"), over)
    build_model(cfg.model).save_pretrained(tmp_path / "tiny")
    capsys.readouterr()
    assert main(["eval", "action", "--model", str(tmp_path / "tiny"), *args]) == 2
    assert "no text tower: pass --text-encoder" in capsys.readouterr().err
