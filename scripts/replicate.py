"""Scaled-down replication of the four papers on the synthetic benchmark (CPU, tiny model).

    python scripts/replicate.py --out runs/replicate                 # everything, from nothing
    python scripts/replicate.py --out runs/replicate --only judges,dpo --sft runs/sft/final
    python scripts/replicate.py --out runs/replicate-3 --seeds 0,1,2   # mean ± std over seeds

Every method starts from the same SFT checkpoint; the SFT model judges its own answers where the
papers use a model judge (VLM-RLAIF, ISR-DPO), and the oracle stands in for LLaVA-Hound's
caption-proxy LLM judge and Oracle-RLAIF's ranker. See `vlmalign/pipeline.py` for the stages.
Results: OUT/results.md and OUT/results.json. Re-running resumes.
"""

from __future__ import annotations

import argparse
import dataclasses

from vlmalign.pipeline import FULL, STAGES, run_seeds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/replicate")
    p.add_argument("--only", default=",".join(STAGES), help=f"comma-separated subset of {', '.join(STAGES)}")
    p.add_argument("--sft", default=None, help="start every method from this SFT checkpoint instead of training one")
    p.add_argument("--oracle-judge", action="store_true", help="the oracle judges everywhere (no self-judging)")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds (OUT/seed-N each; mean ± std in OUT/results.md)")
    for field in dataclasses.fields(FULL):
        if field.name in ("self_judge", "sft_overrides", "judge_data", "seed"):
            continue
        p.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=getattr(FULL, field.name))
    args = p.parse_args()
    budget = dataclasses.replace(
        FULL, self_judge=not args.oracle_judge,
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(FULL)
           if f.name not in ("self_judge", "sft_overrides", "judge_data", "seed")},
    )
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    run_seeds(args.out, budget, seeds, stages=args.only.split(","), sft=args.sft)


if __name__ == "__main__":
    main()
