"""`vlmalign demo`: the embedded default, the alignment gym (`vlmalign.gym`) on a laptop CPU.

Measured: 3 min 48 s on two idle cores (thirteenth session; docs/results.md, "The demo").

One seed on the gym's quick budget: the benchmark with its declared misalignment, the clean-SFT
ceiling, the injected-SFT start, and DPO and GRPO with their negative controls, fed by the
benchmark's oracle; it prints one table of held-out accuracy and gains over the start. Everything
lands in `OUT/`; re-running resumes or reuses finished stages. `vlmalign gym` is the perception design
on three seeds; `scripts/replicate.py` runs the older pipeline with the SFT model judging itself.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vlmalign.gym import QUICK, run_gym


def run_demo(out: str | Path = "runs/demo", seeds=(0,), family: str = "video_lm") -> list[dict]:
    """`family`: the model every run trains (`gym.FAMILIES`); a tiny random Qwen2.5-VL with `qwen2_5_vl`."""
    command = "vlmalign demo" + (f" --seeds {','.join(map(str, seeds))}" if list(seeds) != [0] else "")
    command += f" --family {family}" if family != "video_lm" else ""
    return run_gym(out, dataclasses.replace(QUICK, family=family), list(seeds), progress=True, command=command)
