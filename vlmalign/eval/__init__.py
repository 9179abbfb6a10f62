"""Evaluation: `vlmalign eval BENCHMARK` (see `command` for the routing).

- `qa`: zero-shot open-ended QA judged yes/no + 0-5 (MSVD-, MSRVTT-, TGIF-, ActivityNet-QA, synthetic);
  `synthetic.evaluate_synthetic` is its oracle-judged form that the training stages call;
- `mcq`: multiple choice with letter extraction (Video-MME layout), no judge;
- `generative`: the five-criteria generative benchmark, judged 0-5;
- `compare`: reports side by side;
- `common`: judge configs, resumable answer generation, output files; `replies`: judge reply parsers.
"""
