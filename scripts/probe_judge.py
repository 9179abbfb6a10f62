"""Does a local judge read the answers? Its accuracy on true-vs-wrong pairs of the synthetic benchmark.

    python scripts/probe_judge.py --bench runs/replicate/bench --judge runs/replicate/sft/final
    python scripts/probe_judge.py --bench B --judge MODEL --questions B/sft_easy.json   # its training questions
    python scripts/probe_judge.py --bench B --judge READER --backend likelihood --text-only  # the gym's reader judge

Each question gets the oracle's reference answer and another video's reference answer to the same
question, in random order (`vlmalign/feedback/judge_probe.py`); the judge picks one, once without
context and once with the video's caption. The true answer is first in half the pairs, so a
judge that follows the position scores 50%.
The judge is a saved model folder (vlmalign or transformers), asked with the bundled tiny-model
prompts unless --prompts says otherwise: `hf` generates a verdict, `likelihood` picks the answer it
finds likelier (--text-only: without the video); verdicts are cached in OUT/judge_cache.sqlite.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlmalign.config import ContextConfig, JudgeConfig
from vlmalign.feedback.judge_probe import probe_judge, true_vs_wrong_pairs
from vlmalign.feedback.judges import build_judge
from vlmalign.feedback.oracle import Oracle
from vlmalign.feedback.preferences import build_contexts, read_questions

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", required=True, help="synthetic benchmark folder (vlmalign make-synthetic)")
    parser.add_argument("--judge", required=True, help="saved model folder that judges")
    parser.add_argument("--questions", help="question file (default: BENCH/qa_val.json)")
    parser.add_argument("--limit", type=int, default=200, help="questions read from the file")
    parser.add_argument("--backend", choices=("hf", "likelihood"), default="hf", help="how the model judges")
    parser.add_argument("--text-only", action="store_true", help="the judge does not see the video")
    parser.add_argument("--prompts", default=str(REPO / "configs" / "tiny" / "prompts"))
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="which wrong answer and which order")
    parser.add_argument("--out", help="folder for the cache and probe.json (default: JUDGE/../probe-QUESTIONS)")
    args = parser.parse_args()
    from vlmalign.cli import quiet_libraries

    quiet_libraries()

    bench = Path(args.bench)
    question_file = Path(args.questions or bench / "qa_val.json")
    out = Path(args.out) if args.out else Path(args.judge).parent / f"probe-{question_file.stem}"
    out.mkdir(parents=True, exist_ok=True)
    questions = read_questions([str(question_file)], None, args.limit)
    pairs = true_vs_wrong_pairs(Oracle.from_dir(bench), questions, args.seed)
    judge = build_judge(JudgeConfig(backend=args.backend, model=args.judge, max_new_tokens=args.max_new_tokens, prompts=args.prompts,
                                    read_video=not args.text_only), out / "judge_cache.sqlite")
    captions = build_contexts(ContextConfig(kind="caption", captions=str(bench / "captions.json")), None, None,
                              [p.question for p in pairs])
    results = {"none": probe_judge(judge, pairs), "caption": probe_judge(judge, pairs, captions)}
    (out / "probe.json").write_text(json.dumps({"judge": args.judge, "questions_file": str(question_file), "questions": len(questions),
                                                "pairs": len(pairs), "seed": args.seed, **results}, indent=2))
    print(f"{len(pairs)} true-vs-wrong pairs from {len(questions)} questions; judge {args.judge}")
    for name, r in results.items():
        accuracy = "n/a" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%"
        first = "n/a" if r["first_answer_chosen"] is None else f"{100 * r['first_answer_chosen']:.0f}%"
        print(f"  context {name:8s} accuracy {accuracy} of {r['n']}, first answer chosen {first}, not judged {r['not_judged']}")
    print(f"written: {out / 'probe.json'}")


if __name__ == "__main__":
    main()
