"""`vlmalign gym`: a testbed that shows whether an alignment method works, with its controls.

The premise of the papers, built in and declared up front (`synthetic.Misalignment`): the SFT
model answers from language priors. A share of the train split's short answers (`prior_rate`,
0.75) state a prior that depends on the question's wording (`synthetic.PRIORS`) instead of the
truth, and half of its descriptions gain an invented object. Captions, judge data and the held-out
files stay true. The misalignment is the same for every method and is never tuned per method.

Per seed, from one benchmark:

  ceiling   SFT on the true answers (what perception allows)
  start     SFT on the injected answers: the start of every method; its pass@k and the share of
            correct answers among its samples say how much its own samples hold to learn from
  methods   each from the start, fed by the benchmark's oracle (a grounded judge):
            dpo        LLaVA-Hound: 6 samples scored 1-5, chosen >= 3, rejected <= 2
            grpo       plain GRPO on the oracle's 1-5 scores
            grpo_rank  Oracle-RLAIF's rank advantage on the oracle's ranking
            grpo_rank_monotone  the same ranking, an advantage that always prefers better-ranked
                       answers (losses.grpo_rank_monotone_advantages)
            ppo        VLM-RLAIF's RM + PPO: a reward model on oracle pairs (scored as DPO's, from a sample
                       of its own), PPO against it
            ppo_oracle PPO with the oracle's 1-5 score as its reward, no reward model: RM + PPO with a
                       perfect reward model, which tells what the reward model costs from what PPO does
  controls  the same run with the feedback destroyed, same budget: grpo and ppo_oracle on random
            scores, both grpo_rank on random rankings (the `random` judge: verdicts unrelated to
            truth); dpo and ppo on swapped pairs (the feedback reversed: these must lose, and check
            its direction)
  reader    the AI-feedback provider of the judged methods: a small model of the policy's size, trained
            apart on text only (the train split's true answers after the video's caption, its clip
            captions, its true description or no context; `reader_records`; in the perception design
            first on the colour records alone, GYM/reader-first), that judges by likelihood
            (`judge.backend: likelihood`): the answer it finds likelier after the context wins. The
            SFT model itself stays at chance as a judge (docs/results.md), so the papers' self-judge is
            replaced by this separately trained judge; it reads contexts the start model writes.
            Its probe (true vs wrong answer on held-out questions) is reported per context.
  judged    methods fed by the reader instead of the oracle, each with its context-free twin:
            isr_dpo    ISR-DPO: the start's own pairs judged with its retrospective context, DPO,
                       iterated; twin: no context; control: the random judge
            vlm_rlaif  VLM-RLAIF: the start's pairs judged with its 3-clip narrative, a reward model on
                       them, PPO; twin: no context; control: the narrative-judged pairs swapped

Everything is evaluated on the held-out QA file (greedy, oracle-judged), also split by whether the
truth equals the question's prior (a method that merely learns to avoid the prior loses there).
`OUT/gym.md` holds the table: every row, the gain over the start as mean ± sd over seeds, and the
command that made it. Every stage resumes: re-running skips what is finished.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from vlmalign.config import DPOConfig, GRPOConfig, PPOConfig, RMConfig, SFTConfig, load_config
from vlmalign.data.formats import append_jsonl, iter_json_records, read_json, write_json
from vlmalign.errors import VlmalignError
from vlmalign.pipeline import CONFIGS, Budget, Pipeline, _sets, mean_std

METHODS = ("dpo", "grpo", "grpo_rank", "grpo_rank_monotone", "ppo", "ppo_oracle", "isr_dpo", "vlm_rlaif")
JUDGED = ("isr_dpo", "vlm_rlaif")  # fed by the reader judge, not the oracle
QTYPES = ("colour", "count", "direction", "shape")


@dataclass(frozen=True)
class GymBudget:
    videos: int = 480
    splits: tuple[float, float, float] = (0.5, 0.05, 0.45)  # 216 held-out videos: 1,108 questions
    max_objects: int = 2  # objects per video: 1 makes attributes unambiguous (the CI learning test)
    # At 0.5 the start's greedy answer sat on a knife's edge between the prior and the truth, so even
    # GRPO on random scores "gained" 6.4 points by tipping it (docs/results.md); at 0.75 the start
    # holds its prior and its samples still hold the truth. Declared here, the same for every method.
    prior_rate: float = 0.75
    invent_rate: float = 0.5
    # Of the short answers the prior leaves alone, the share given the question's runner-up (a second
    # wrong value, `synthetic.RUNNER_UPS`), so that the start's second choice is not the truth.
    runner_up_rate: float = 0.0
    # SFT on 240 training videos: 4 epochs at batch 32 left even colour at chance (24%), 8 reached
    # colour 74% / count 78%; batch 8 did better at 4 epochs (50%) but not at 8 (52% / 47%). At 8 the
    # clean SFT was still learning (3 seeds: 40.5 +- 2.1 overall, and oracle-fed DPO and GRPO ended
    # above it); 16 epochs reached 51.4 on seed 0, so the gym trains both SFT models for 16.
    sft_epochs: int = 16
    sft_batch_size: int = 32
    # The SFT optimiser; None: configs/tiny/sft.yaml's (lr 2e-3, cosine, no weight decay).
    sft_lr: float | None = None
    sft_scheduler: str | None = None
    sft_weight_decay: float | None = None
    # A perception stage both SFT models start from (0 steps: none): SFT with their optimiser on the
    # true answers to the `perception_types` questions about the training videos of one object.
    # Next-token SFT learns direction only after a ~1,000-step plateau at the loss of knowing the
    # wording but not the direction, which a fifth of the gym's SFT never leaves (docs/results.md,
    # "Direction alone, on the probe's data"). It is the same for the ceiling and the start: the
    # declared misalignment comes after it.
    perception_steps: int = 0
    perception_types: tuple[str, ...] = ("direction", "shape")
    # Each frame's visual tokens (`model.frame_grid`): 1, Video-ChatGPT's one mean per frame, or a
    # g x g grid that keeps where things are in each frame (what the direction of motion needs).
    frame_grid: int = 1
    visual_positions: bool = False  # `model.visual_positions`: a learned embedding per visual token
    # The feedback budget: how far each method may move from the start. It was chosen once, on seed 0's
    # start, for DPO and GRPO (docs/results.md): DPO 2 epochs at lr 2e-4 (22 steps) gained +1.0, 8 at
    # 2e-4 +6.1, 8 at 5e-4 +12.5; GRPO 40 rollouts at 1e-4 +0.6, 77 at 1e-4 +3.7, 150 at 3e-4 +11.7.
    # Their controls take the same budget, GRPO_rank takes GRPO's, and the misalignment stayed as it was.
    dpo_questions: int = 800
    dpo_epochs: int = 8
    dpo_lr: float = 5e-4
    # configs/tiny/dpo.yaml adds an SFT term on the chosen answers (LLaVA-Hound's optional weight,
    # 0 in its 7B run); on its own it can carry a gain, so the CI test sets it to 0 to test DPO itself.
    dpo_sft_weight: float = 1.0
    grpo_rollouts: int = 150
    grpo_lr: float = 3e-4
    # The reward models' training questions. VLM-RLAIF's: 2 samples each, compared by a judge (the
    # judged rows). The oracle's RM + PPO scores 6 samples of each as DPO's pairs are scored and takes
    # every good-against-poor pair (judged pairwise, 690 of 800 seed-0 pairs were ties: both answers
    # equally right or wrong; docs/results.md).
    rm_questions: int = 800
    # RM + PPO takes GRPO's budget (rollouts of 16 questions, lr), as declared before it was run; the
    # reward model trains on its pairs with configs/tiny/rm.yaml's own settings.
    ppo_rollouts: int = 150
    ppo_lr: float = 3e-4
    # PPO's KL coefficient for every PPO row (None: configs/tiny/ppo.yaml's 0.1, VLM-RLAIF's released value).
    ppo_kl_coef: float | None = None
    # The reader judge: a fresh model of the policy's size, SFT on text only (4 contexts per training
    # question). Declared before it was run: the SFT models' own batch and optimiser, 8 epochs.
    reader_epochs: int = 8
    # A first reader stage on the records of these question types alone (none: no first stage), for
    # `reader_first_epochs`, that the mix then continues. The fifteenth session's perception reader
    # read colour only after such a stage; with the SFT models' optimiser the mix alone reads every
    # type (docs/results.md), so no design has one now.
    reader_first_types: tuple[str, ...] = ()
    reader_first_epochs: int = 3
    # ISR-DPO takes DPO's budget (questions, lr, 8 epochs in all), split over its iterations.
    isr_iterations: int = 2
    eval_limit: int | None = None
    methods: tuple[str, ...] = METHODS
    bench_seed: int = 0
    # The model family every run trains (`model/policy.py`): vlmalign's VideoLM, or a tiny random
    # transformers video model of the same LLM size, built offline from the benchmark's words
    # (`HF_FAMILIES`).
    family: str = "video_lm"


# --family: the transformers class of each tiny random HF model, and the frames it reads (8 frames of
# 56 x 56 pixels: Qwen 4 temporal patches of 2 x 2 merged patches, 16 visual tokens per video; the
# LLaVA towers read 56-pixel frames as 4 x 4 patches: 33 tokens (OneVision), 32 (NeXT-Video), 136 (Video-LLaVA))
HF_FAMILIES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration",
               "qwen3_vl": "Qwen3VLForConditionalGeneration", "llava_onevision": "LlavaOnevisionForConditionalGeneration",
               "llava_next_video": "LlavaNextVideoForConditionalGeneration", "video_llava": "VideoLlavaForConditionalGeneration"}
HF_FRAMES = {"model__num_frames": 8, "model__frame_size": "[56,56]", "model__train_projector": "false"}
# Qwen3-VL's 16-pixel patches merge 2 x 2, so its frames are multiples of 32 (4 x 2 x 2 = 16 tokens again)
HF_FRAME_SIZE = {"qwen3_vl": "[64,64]"}
FAMILIES = ("video_lm", *HF_FAMILIES)

# `vlmalign gym --design NAME`: the benchmark designs, each declared in docs/results.md before it ran.
# `pooled` (the design before the grid ones): every frame pooled as Video-ChatGPT does, 240
# training videos, 16 SFT epochs; measured: its ceiling's direction and shape stay near chance.
POOLED = GymBudget()
# `quick` (the demo, <= 10 minutes on two cores): fewer videos, and DPO and GRPO with their controls only.
QUICK = GymBudget(videos=300, splits=(0.6, 0.05, 0.35), sft_epochs=8, dpo_questions=400, grpo_rollouts=50, rm_questions=400,
                  ppo_rollouts=50, methods=("dpo", "grpo"))
# `grid`: the perception redesign (docs/results.md, "The grid design"). A reader of the model's size
# learnt direction from its visual tokens only with each frame kept as a 2 x 2 grid, with a learned
# position per token, and only from ~2,000 videos (240 overfit), so: 2,100 training videos (the same
# 216 held-out videos' worth of test), frame grid 2, learned visual positions, and 4 SFT epochs
# (~1,600 steps, about twice the 16-epoch SFT's on 240 videos). Measured: it misses its aim; the
# ceiling's direction stays at chance with or without the positions (docs/results.md). The reader
# judge's records grow with the videos (49,316 from 2,100, against 5,680 from 240), so it trains one
# epoch: 1,541 steps, about the 8-epoch reader's 1,424 on 240 videos (declared before it ran).
GRID = GymBudget(videos=2400, splits=(0.875, 0.035, 0.09), frame_grid=2, visual_positions=True, sft_epochs=4,
                 reader_epochs=1)
# `perception`, the default: the grid design with a perception stage, declared in docs/results.md
# before it ran: 3,000 steps of direction and shape on the 1,038 one-object training videos, then both
# SFT models from it; every SFT stage at lr 1e-3, constant, weight decay 0.01 (the optimiser with which
# direction left its plateau). Measured on 3 seeds: gap +42.0, oracle-fed DPO +31.6 and GRPO +31.5,
# their controls within about a point; the pooled design's were +18.4, +13.9 and +12.4.
# Its reader (declared before it ran, sixteenth session): 2 epochs of the whole mix (3,084 steps) with
# the design's SFT optimiser, as every SFT model (`Gym.sft_optimiser`). The fifteenth session's reader
# (3 epochs of colour first, then the mix at configs/tiny/sft.yaml's lr 2e-3, cosine) read colour but
# lost shape and never read direction: 73.6% with the caption on 3 seeds; this one 95.2% on seed 0's
# probe, every type above 92% (docs/results.md).
# Its reward models (declared before it ran, eighteenth session): 3,200 training questions each, and PPO
# at KL 0.5. With 800 the oracle pairs' reward model reached ~61% held out and RM + PPO lost 2.4 ± 11.7;
# with 3,200 it reached 65-73%, and PPO at 0.1 found off-topic answers its reward model never saw
# ("it is a yellow." to shape questions), while at 0.5 it gained +14.2 ± 8.2 (docs/results.md).
PERCEPTION = dataclasses.replace(GRID, sft_lr=1e-3, sft_scheduler="constant", sft_weight_decay=0.01, perception_steps=3000,
                                 reader_epochs=2, rm_questions=3200, ppo_kl_coef=0.5)
DESIGNS = {"perception": PERCEPTION, "grid": GRID, "pooled": POOLED, "quick": QUICK}


class Gym:
    def __init__(self, out, budget: GymBudget, seed: int, bench: Path, feature_cache: Path, progress: bool = False):
        self.out, self.budget, self.seed = Path(out), budget, seed
        self.bench = Path(bench)
        # The pipeline's stage configs (tokenizer, feature cache, prompts, oracle) serve the gym too.
        self.pipe = Pipeline(self.out, Budget(seed=seed, eval_limit=budget.eval_limit), progress, self.bench, feature_cache)
        self.common = self.pipe.common()
        if budget.frame_grid != 1:
            self.common["model__frame_grid"] = budget.frame_grid
        if budget.visual_positions:
            self.common["model__visual_positions"] = "true"
        if budget.family != "video_lm":
            self.common.update(HF_FRAMES, model__frame_size=HF_FRAME_SIZE.get(budget.family, HF_FRAMES["model__frame_size"]))

    def initial_model(self, path: Path | None = None, seed: int | None = None) -> dict:
        """Where SFT starts: a fresh VideoLM from configs/tiny, or a tiny random HF video model saved
        (once, seeded: by default the seed's, in SEED_DIR/tiny-init) and loaded like a hub checkpoint."""
        if self.budget.family == "video_lm":
            return {}
        from vlmalign.model.hf_video import save_tiny_hf_video
        from vlmalign.model.tokenizer import corpus_words

        path = path or self.out / "tiny-init"
        if not (path / "config.json").is_file():
            words = corpus_words([self.bench / f for f in ("sft_mix.json", "judge_train.json", "captions.json")])
            save_tiny_hf_video(path, words, HF_FAMILIES[self.budget.family], hidden=128, layers=2,
                               seed=self.seed if seed is None else seed)
        return {"model__init_from": path}

    # --- models ------------------------------------------------------------------------------------
    def sft(self, name: str, files: list[str], steps: int | None = None, start: Path | None = None) -> Path:
        """SFT on the benchmark's `files` for the budget's epochs, or for `steps` (as many epochs as
        they take), from `start` or else the initial model."""
        from vlmalign.train import sft

        b = self.budget
        length = {"train__epochs": b.sft_epochs}
        if steps is not None:
            samples = sum(len(read_json(self.bench / f)) for f in files)
            length = {"train__epochs": math.ceil(steps / math.ceil(samples / b.sft_batch_size)), "train__max_steps": steps}
        cfg = load_config(SFTConfig, CONFIGS / "sft.yaml", _sets(
            run__dir=self.out / name, curriculum__criterion="none", train__batch_size=b.sft_batch_size,
            train__seed=self.seed, data__train="[" + ",".join(str(self.bench / f) for f in files) + "]", data__max_length=512,
            **length, **self.sft_optimiser(), **({"model__init_from": start} if start else self.initial_model()), **self.common))
        return sft.run(cfg)

    def sft_optimiser(self) -> dict:
        """The budget's SFT optimiser settings, where it sets them (else configs/tiny/sft.yaml's): every
        SFT model of the gym trains with them, the reader judge included."""
        b = self.budget
        return {k: v for k, v in {"train__lr": b.sft_lr, "train__scheduler": b.sft_scheduler,
                                  "train__weight_decay": b.sft_weight_decay}.items() if v is not None}

    def perception(self) -> Path:
        """The perception stage's model: SFT on the true answers to the `perception_types` questions
        about the training videos that show one object."""
        data = self.bench / "perception_train.json"  # beside the files whose videos its rows name
        if not data.is_file():
            one_object = {v["id"] for _, v in iter_json_records(self.bench / "metadata.jsonl")
                          if v["split"] == "train" and len(v["objects"]) == 1}
            rows = [r for f in ("sft_clean_easy.json", "sft_clean_hard.json") for r in read_json(self.bench / f)
                    if r["question_type"] in self.budget.perception_types and r["id"].rsplit("_q", 1)[0] in one_object]
            if not rows:
                raise VlmalignError(f"perception stage: no {', '.join(self.budget.perception_types)} questions about "
                                    f"one-object training videos in {self.bench} (max_objects {self.budget.max_objects})")
            write_json(data, rows)  # seeds may run side by side: each writes the same rows, whole
        return self.sft("perception", [data.name], steps=self.budget.perception_steps)

    def oracle_pairs(self, start: Path, name: str, questions: int) -> Path:
        """The oracle's preference pairs (NAME/prefs): 6 samples of the start for each of `questions`
        training questions, scored 1-5, chosen >= 3 against rejected <= 2: DPO's pairs, and the
        samples of RM + PPO's reward model."""
        from vlmalign.feedback import preferences

        prefs_dir = self.out / name / "prefs"
        if not (prefs_dir / "stats.json").is_file():
            preferences.run(self.pipe.prefs_config(prefs_dir, start, preferences__limit=questions))
        return prefs_dir / "preferences.jsonl"

    def dpo(self, start: Path, control: bool) -> Path:
        from vlmalign.feedback import preferences
        from vlmalign.train import dpo

        pairs = self.oracle_pairs(start, "dpo", self.budget.dpo_questions)
        if control:
            pairs = preferences.swap_preferences(pairs, self.out / "dpo-control" / "swapped.jsonl")
        return dpo.run(load_config(DPOConfig, CONFIGS / "dpo.yaml", _sets(
            run__dir=self.out / ("dpo-control" if control else "dpo") / "train", model__init_from=start,
            train__seed=self.seed, train__epochs=self.budget.dpo_epochs, train__lr=self.budget.dpo_lr,
            dpo__sft_weight=self.budget.dpo_sft_weight,
            data__train=f"[{pairs}]", **self.common)))

    def grpo(self, start: Path, advantage: str, control: bool) -> Path:
        from vlmalign.train import grpo_rank

        judge = {"judge__backend": "random", "judge__seed": self.seed} if control else {"judge__bench": self.bench}
        name = advantage + ("-control" if control else "")
        return grpo_rank.run(load_config(GRPOConfig, CONFIGS / "grpo_rank.yaml", _sets(
            run__dir=self.out / name, model__init_from=start, data__train=f"[{self.bench}/sft_easy.json]",
            grpo__advantage=advantage, train__max_steps=self.budget.grpo_rollouts, train__lr=self.budget.grpo_lr,
            train__seed=self.seed,
            eval_qa="null", **judge, **self.common)))

    def ppo(self, start: Path, control: bool, name: str = "ppo", feedback: dict | None = None) -> Path:
        """RM + PPO: a reward model on preference pairs of `rm_questions` training questions (swapped
        for the control), PPO against it. The pairs: the oracle's, its samples scored as DPO's
        (`oracle_pairs`, in NAME/prefs), every good answer of a question against every poor one
        (`preferences.every_pair`: DPO keeps one pair per question, a reward model learns from all of
        them); or, with `feedback` (judge and context settings of make-prefs), 2 samples per question
        judged pairwise, VLM-RLAIF's protocol, in NAME/prefs. The runs live in NAME[-control]/."""
        from vlmalign.feedback import preferences
        from vlmalign.train import ppo, rm

        if feedback is None:
            scored = self.oracle_pairs(start, name, self.budget.rm_questions)
            thresholds = self.pipe.prefs_config(scored.parent, start).preferences  # the settings its pairs took
            pairs = preferences.every_pair(scored, self.out / name / "every_pair.jsonl",
                                           thresholds.chosen_min, thresholds.rejected_max)
        else:
            prefs_dir = self.out / name / "prefs"
            if not (prefs_dir / "stats.json").is_file():
                preferences.run(self.pipe.prefs_config(
                    prefs_dir, start, preferences__method="pairwise", sampling__num_samples=2,
                    preferences__limit=self.budget.rm_questions, **feedback))
            pairs = prefs_dir / "preferences.jsonl"
        run_name = name + ("-control" if control else "")
        if control:
            pairs = preferences.swap_preferences(pairs, self.out / run_name / "swapped.jsonl")
        rm_final = rm.run(load_config(RMConfig, CONFIGS / "rm.yaml", _sets(
            run__dir=self.out / run_name / "rm", model__init_from=start, train__seed=self.seed,
            data__train=f"[{pairs}]", **self.common)))
        return ppo.run(load_config(PPOConfig, CONFIGS / "ppo.yaml", _sets(
            run__dir=self.out / run_name / "ppo", model__init_from=start, reward_model=rm_final, eval_qa="null",
            data__train=f"[{self.bench}/sft_easy.json]", **self.ppo_budget(), **self.common)))

    def ppo_oracle(self, start: Path, control: bool) -> Path:
        """PPO on the oracle's 1-5 scores (the random judge's for the control), RM + PPO's budget; no
        reward model: the value model is the start with a new head."""
        from vlmalign.train import ppo

        judge = {"judge__backend": "random", "judge__seed": self.seed} if control else {"judge__bench": self.bench}
        return ppo.run(load_config(PPOConfig, CONFIGS / "ppo.yaml", _sets(
            run__dir=self.out / ("ppo_oracle-control" if control else "ppo_oracle"), model__init_from=start,
            reward="judge", reward_model="", eval_qa="null", data__train=f"[{self.bench}/sft_easy.json]",
            **self.ppo_budget(), **judge, **self.common)))

    def ppo_budget(self) -> dict:
        """Every PPO row's budget: rollouts, lr, seed, and the KL coefficient where the budget sets one."""
        b = self.budget
        kl = {} if b.ppo_kl_coef is None else {"ppo__kl_coef": b.ppo_kl_coef}
        return {"train__max_steps": b.ppo_rollouts, "train__lr": b.ppo_lr, "train__seed": self.seed, **kl}

    # --- the reader judge and the methods it feeds ---------------------------------------------------
    def reader(self) -> Path:
        """The reader judge: a fresh model of the policy's size, SFT on `reader_records` (text only),
        after a first stage on the `reader_first_types` records alone where the budget has one.
        Like an external judge it is one model for every seed (GYM/reader, seeded by the benchmark's
        seed); the seeds vary the policies it judges."""
        from vlmalign.train import sft

        b, root = self.budget, self.out.parent

        def train(run_dir: Path, records: Path, epochs: int, start: dict) -> Path:
            return sft.run(load_config(SFTConfig, CONFIGS / "sft.yaml", _sets(
                run__dir=run_dir, curriculum__criterion="none", train__epochs=epochs, train__batch_size=b.sft_batch_size,
                train__seed=b.bench_seed, data__train=f"[{records}]", data__max_length=512, **self.sft_optimiser(),
                **start, **self.common)))

        with one_writer(root / ".reader.lock"):
            records = reader_records(self.bench, root / "reader-data" / "records.json")
            start = self.initial_model(root / "reader-init", b.bench_seed)
            if b.reader_first_types:
                name = "records-" + "-".join(b.reader_first_types) + ".json"
                first = typed_records(records, b.reader_first_types, root / "reader-data" / name)
                start = {"model__init_from": train(root / "reader-first", first, b.reader_first_epochs, start)}
            return train(root / "reader", records, b.reader_epochs, start)

    @staticmethod
    def reader_settings(reader: Path) -> dict:
        """The `judge` section that makes the reader judge by likelihood, reading text only."""
        return {"backend": "likelihood", "model": str(reader), "read_video": False, "prompts": str(CONFIGS / "prompts"),
                "batch_size": 32}

    def reader_judge(self, reader: Path, prefix: str = "") -> dict:
        """`reader_settings` as config overrides under a config-key `prefix`."""
        return {f"{prefix}judge__{key}": value for key, value in self.reader_settings(reader).items()}

    def probe_reader(self, reader: Path, start: Path) -> dict:
        """The reader's accuracy on a true and a wrong answer to each held-out test question, with no
        context, the video's caption, and the start model's 3-clip narrative."""
        from vlmalign.config import ContextConfig, JudgeConfig, config_from_dict
        from vlmalign.data import synthetic as syn
        from vlmalign.feedback.judge_probe import probe_judge, true_vs_wrong_pairs
        from vlmalign.feedback.judges import build_judge
        from vlmalign.feedback.oracle import Oracle
        from vlmalign.feedback.preferences import build_contexts, read_questions
        from vlmalign.model.policy import load_model

        out = self.out / "reader-probe"
        if (out / "probe.json").is_file():
            return read_json(out / "probe.json")
        out.mkdir(parents=True, exist_ok=True)
        questions = read_questions([str(self.bench / "qa_test.json")], None, None)
        pairs = true_vs_wrong_pairs(Oracle.from_dir(self.bench), questions, self.seed)
        asked = [p.question for p in pairs]
        judge = build_judge(config_from_dict(JudgeConfig, self.reader_settings(reader)), out / "judge_cache.sqlite", progress=False)
        model = load_model(start).eval()
        contexts = {
            "none": {},
            "caption": build_contexts(ContextConfig(kind="caption", captions=str(self.bench / "captions.json")), None, None, asked),
            "narrative": build_contexts(ContextConfig(kind="narrative", clips=3, max_new_tokens=64), model,
                                        model.visual_inputs(self.pipe.feature_cache), asked, prompts_path=CONFIGS / "prompts"),
        }
        by_type = {t: [p for p in pairs if syn.parse_question(p.question.question).qtype == t] for t in QTYPES}
        result = {}
        for name, ctx in contexts.items():
            result[name] = probe_judge(judge, pairs, ctx)  # each pair judged once: the split below reads the cache
            result[name]["by_type"] = {t: probe_judge(judge, typed, ctx)["accuracy"] for t, typed in by_type.items() if typed}
        write_json(out / "probe.json", result, indent=2)
        return result

    def isr_questions(self) -> Path:
        """ISR-DPO's questions: the training videos' questions video by video, each video's short ones
        and then its describe one, so that the first `dpo_questions` hold short answers (where the
        misalignment is) and long ones (where the paper's length claim is) in the benchmark's
        proportion. Listing every describe question first, as the gym did until the fifteenth
        session, left no short question once the training videos outnumbered DPO's 800 questions
        (2,100 in the grid designs), and the judge only ever compared two descriptions."""
        path = self.bench / "isr_questions.json"  # beside the files whose videos its rows name
        if not path.is_file():
            rows = [r for f in ("sft_easy.json", "sft_hard.json") for r in read_json(self.bench / f)]
            order: dict[str, int] = {}
            for r in rows:
                order.setdefault(r["video"], len(order))
            rows.sort(key=lambda r: order[r["video"]])  # stable: a video's short questions keep their order
            write_json(path, rows)  # seeds may run side by side: each writes the same rows, whole
        return path

    def isr_dpo(self, start: Path, name: str, mode: str, judge: dict) -> Path:
        """ISR-DPO from the start: each iteration the policy answers DPO's number of questions
        (`isr_questions`) twice, writes its `mode` context per video, the judge picks from each pair,
        DPO trains the next policy."""
        from vlmalign.train import dpo

        return dpo.run(load_config(DPOConfig, CONFIGS / "isr_dpo.yaml", _sets(
            run__dir=self.out / name, model__init_from=start, loop__iterations=self.budget.isr_iterations,
            loop__questions=f"[{self.isr_questions()}]", loop__limit=self.budget.dpo_questions,
            loop__sampling__max_new_tokens=64,
            loop__context_mode=mode, loop__preferences__oracle=self.bench, loop__eval_qa="null",
            train__seed=self.seed, train__epochs=max(1, self.budget.dpo_epochs // self.budget.isr_iterations),
            train__lr=self.budget.dpo_lr, dpo__sft_weight=self.budget.dpo_sft_weight,
            # the policy writes its contexts from the tiny prompts whatever judges; isr_dpo.yaml names
            # them relative to the repository, which is not where a gym runs from
            **{"loop__judge__prompts": CONFIGS / "prompts", **judge}, **self.common)))

    # --- measurements ------------------------------------------------------------------------------
    def evaluate(self, model_dir: Path) -> dict:
        """Held-out accuracy per question type and overall, and split by truth == prior."""
        from vlmalign.eval.synthetic import evaluate_synthetic

        out = model_dir.parent / "gym-eval"
        report = read_json(out / "report.json") if (out / "report.json").is_file() else evaluate_synthetic(
            model_dir, self.bench, out, limit=self.budget.eval_limit, feature_cache=self.pipe.feature_cache, progress=False)
        row = {q: r["accuracy"] for q, r in report["results"].items()}
        row.update(prior_split(self.bench, out))
        return row

    def start_samples(self) -> dict:
        """pass@k and the share of correct answers among the start's samples (the DPO stage's k = 6
        samples at T = 1 on training questions): what its own samples hold to learn from."""
        from vlmalign.feedback.oracle import Oracle
        from vlmalign.feedback.preferences import read_questions

        path = self.out / "dpo" / "prefs" / "samples.jsonl"
        if not path.is_file() or not path.read_text(encoding="utf-8").strip():
            return {}
        oracle = Oracle.from_dir(self.bench)
        questions = {q.id: q for q in read_questions([str(self.bench / "sft_easy.json")], None, None)}
        hits = []
        for _, row in iter_json_records(path):
            q = questions[row["id"]]
            hits.append([oracle.verdict(q.video, q.question, a["text"]).correct for a in row["answers"]])
        return {"k": len(hits[0]), "pass_at_k": sum(any(h) for h in hits) / len(hits),
                "correct_share": sum(sum(h) for h in hits) / sum(len(h) for h in hits), "questions": len(hits)}


READER_CONTEXTS = ("caption", "clip captions", "description", "none")


def typed_records(records: Path, types: tuple[str, ...], out: Path) -> Path:
    """The records of `records` whose question type is one of `types`, in their order (written once)."""
    if not out.is_file():
        rows = [r for r in read_json(records) if r["question_type"] in types]
        if not rows:
            raise VlmalignError(f"{records}: no {', '.join(types)} records for the reader's first stage")
        write_json(out, rows)
    return out


def reader_records(bench: Path, out: Path) -> Path:
    """The reader judge's training data, text only (LLaVA format, no video), from the train split's
    true answers: each short question (`sft_clean_easy.json`) after each of four contexts (the
    video's detailed caption, its 3 clip captions, its true plain description, none), and each
    describe question with the true description (`sft_clean_hard.json`) after the caption, the clip
    captions or none. A short answer's wording is drawn afresh for every record from all the
    benchmark's wordings of the true value: with one wording per question the reader learnt which
    wording each video's questions had (from the caption) instead of the value, and scored "Two."
    below "One." after a caption saying "two objects". Each prompt is rendered with judge.likelihood,
    the prompt the likelihood judge puts before the answers it scores. Written once; returns the file."""
    import numpy as np

    from vlmalign.data import synthetic as syn
    from vlmalign.feedback.judges import likelihood_prompt
    from vlmalign.feedback.oracle import Oracle

    if out.is_file():
        return out
    for name in ("sft_clean_easy.json", "sft_clean_hard.json", "captions.json"):
        if not (bench / name).is_file():
            raise VlmalignError(f"{bench / name}: missing; the reader judge trains on a benchmark with a declared misalignment")
    oracle = Oracle.from_dir(bench)
    captions = read_json(bench / "captions.json")
    hard = read_json(bench / "sft_clean_hard.json")
    describe = {r["id"].rsplit("_q", 1)[0]: r["conversations"][1]["value"] for r in hard}
    rng = np.random.default_rng(0)
    records = []
    for r in read_json(bench / "sft_clean_easy.json") + hard:
        vid = r["id"].rsplit("_q", 1)[0]
        question, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
        contexts = dict(zip(READER_CONTEXTS, (captions[vid]["caption"], " ".join(captions[vid]["clip_captions"]["3"]),
                                              describe[vid], "")))
        wordings = [answer]
        if r.get("question_type") == "describe":
            contexts.pop("description")  # the answer itself
        else:
            parsed = syn.parse_question(question)
            wordings = syn.short_answers(parsed.qtype, syn.true_value(oracle.metadata(Path(r["video"]).name), parsed))
        for kind, context in contexts.items():
            _, text = likelihood_prompt(question, context, CONFIGS / "prompts")
            reply = wordings[int(rng.integers(len(wordings)))]
            records.append({"id": f"{r['id']}_{kind.replace(' ', '_')}", "question_type": r.get("question_type"),
                            "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": reply}]})
    write_json(out, records)
    return out


def prior_split(bench: Path, eval_dir: Path) -> dict:
    """Accuracy on held-out questions whose truth equals the question's prior, and on the rest; and
    on the rest, the share of answers that still state the prior ("prior stated"). A model that
    leaves the prior with no information to go on (a control) still gains where its second choice is
    the truth: this column tells leaving the prior from finding the truth."""
    from vlmalign.data import synthetic as syn
    from vlmalign.feedback.oracle import Oracle, extract_values

    oracle = Oracle.from_dir(bench)
    predictions = [row for _, row in iter_json_records(eval_dir / "predictions.jsonl")]
    verdicts = {j["id"]: j["verdict"] == "yes" for _, j in iter_json_records(eval_dir / "judgments.jsonl")}
    groups: dict[str, list[bool]] = {"truth = prior": [], "truth != prior": [], "prior stated": []}
    for p in predictions:
        parsed = syn.parse_question(p["question"])
        prior = syn.prior_value(parsed)
        if syn.true_value(oracle.metadata(p["video_name"]), parsed) == prior:
            groups["truth = prior"].append(verdicts[p["id"]])
        else:
            groups["truth != prior"].append(verdicts[p["id"]])
            groups["prior stated"].append(prior in extract_values(parsed.qtype, p["pred"]))
    return {name: (sum(v) / len(v) if v else None) for name, v in groups.items()}


def tau_over_training(metrics_path: Path) -> dict:
    """Kendall tau between the policy's log-prob ranking and the judge's, at the first and the last
    logged rollout: whether rank training made the policy order its answers as the judge does."""
    taus = [row["kendall_tau"] for _, row in iter_json_records(metrics_path)
            if row.get("kendall_tau") is not None]
    return {"tau_first": taus[0], "tau_last": taus[-1]} if taus else {}


# --------------------------------------------------------------------------------------- running


ROWS = {  # result key -> table label
    "perception": "perception stage (both SFT models start here)",
    "ceiling": "ceiling: SFT on true answers",
    "start": "start: SFT on injected answers",
    "dpo": "DPO (oracle scores)", "dpo-control": "  control: DPO on swapped pairs",
    "grpo": "GRPO (oracle scores)", "grpo-control": "  control: GRPO on random scores",
    "grpo_rank": "GRPO_rank (oracle ranks)", "grpo_rank-control": "  control: GRPO_rank on random ranks",
    "grpo_rank_monotone": "GRPO_rank, monotone advantage (oracle ranks)",
    "grpo_rank_monotone-control": "  control: monotone GRPO_rank on random ranks",
    "ppo": "RM + PPO (oracle pairs)", "ppo-control": "  control: RM + PPO on swapped pairs",
    "ppo_oracle": "PPO on oracle scores (no reward model)", "ppo_oracle-control": "  control: PPO on random scores",
    "isr_dpo": "ISR-DPO (reader judge, retrospective context)",
    "isr_dpo-none": "  twin: ISR-DPO, reader judge without context",
    "isr_dpo-control": "  control: ISR-DPO on random verdicts",
    "vlm_rlaif": "VLM-RLAIF: RM + PPO (reader judge, 3-clip narrative)",
    "vlm_rlaif-none": "  twin: RM + PPO, reader judge without context",
    "vlm_rlaif-control": "  control: RM + PPO on the narrative-judged pairs swapped",
}
# Each method's runs: the method, its context-free twin (judged methods), its negative control.
VARIANTS = {m: ("", "-none", "-control") if m in JUDGED else ("", "-control") for m in METHODS}


@contextmanager
def one_writer(lock: Path):
    """Seeds run as concurrent `vlmalign gym --seeds N` processes on one folder. What they share (the
    benchmark, the reader judge) is made by the first to get here while the others wait, then
    reused: two processes writing the same files would corrupt them."""
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def run_seed(out: Path, budget: GymBudget, seed: int, bench: Path, feature_cache: Path, progress: bool) -> dict:
    gym = Gym(out, budget, seed, bench, feature_cache, progress)
    start_time = time.time()
    results: dict = {"seed": seed}
    perceived = None
    if budget.perception_steps:
        print(f"[gym seed {seed}] perception: {budget.perception_steps} SFT steps on one-object videos", flush=True)
        perceived = gym.perception()
        results["perception"] = gym.evaluate(perceived)
    print(f"[gym seed {seed}] ceiling: SFT on the true answers", flush=True)
    results["ceiling"] = gym.evaluate(gym.sft("ceiling", ["sft_clean_easy.json", "sft_clean_hard.json"], start=perceived))
    print(f"[gym seed {seed}] start: SFT on the injected answers", flush=True)
    start = gym.sft("start", ["sft_easy.json", "sft_hard.json"], start=perceived)
    results["start"] = gym.evaluate(start)
    reader = None
    if any(m in JUDGED for m in budget.methods):
        print(f"[gym seed {seed}] reader judge: SFT on text (contexts, questions, true answers)", flush=True)
        reader = gym.reader()
        results["reader_probe"] = gym.probe_reader(reader, start)
    for method in budget.methods:
        for variant in VARIANTS[method]:
            name = method + variant
            print(f"[gym seed {seed}] {name}", flush=True)
            try:
                results[name] = gym.evaluate(_run_method(gym, start, reader, method, variant))
                if method.startswith("grpo_rank"):
                    results[name].update(tau_over_training(gym.out / name / "metrics.jsonl"))
                results[name].update(feedback_stats(gym.out, method, variant))
            except VlmalignError as e:  # e.g. no preference pairs: say so in the table, run the others
                print(f"[gym seed {seed}] {name} failed: {e}", flush=True)
                results[name] = {"failed": str(e)}
    results["start_samples"] = gym.start_samples()
    results["minutes"] = round(_add_minutes(out, budget.methods, (time.time() - start_time) / 60), 1)
    return results


def _add_minutes(seed_dir: Path, methods, minutes: float) -> float:
    """Log this run's wall minutes in SEED/minutes.jsonl and return the folder's total: a rerun
    reuses finished stages, so its own time alone would read ~0 for work done by earlier runs."""
    log = seed_dir / "minutes.jsonl"
    append_jsonl(log, {"methods": list(methods), "minutes": round(minutes, 2)})
    return sum(row["minutes"] for _, row in iter_json_records(log))


def _run_method(gym: Gym, start: Path, reader: Path | None, method: str, variant: str) -> Path:
    """The final model of one run: `variant` "" (the method), "-none" (its context-free twin) or
    "-control" (the feedback destroyed)."""
    control = variant == "-control"
    if method == "dpo":
        return gym.dpo(start, control)
    if method == "ppo":
        return gym.ppo(start, control)
    if method == "ppo_oracle":
        return gym.ppo_oracle(start, control)
    if method == "isr_dpo":
        judge = ({"loop__judge__backend": "random", "loop__judge__seed": gym.seed} if control
                 else gym.reader_judge(reader, "loop__"))
        return gym.isr_dpo(start, method + variant, "none" if variant == "-none" else "retrospective", judge)
    if method == "vlm_rlaif":
        context = {"context__kind": "none"} if variant == "-none" else {
            "context__kind": "narrative", "context__clips": 3, "context__max_new_tokens": 64}
        name = "vlm_rlaif-none" if variant == "-none" else "vlm_rlaif"
        return gym.ppo(start, control, name, {**gym.reader_judge(reader), **context})
    return gym.grpo(start, method, control)


def feedback_stats(seed_dir: Path, method: str, variant: str) -> dict:
    """What the feedback of a judged run was: the judge's agreement with the oracle on the pairs it
    judged (ISR-DPO: per iteration) and the chosen/rejected length ratio."""
    if method == "isr_dpo":
        summary = read_json(seed_dir / (method + variant) / "summary.json")
        return {"iterations": [{"agreement": s.get("oracle_agreement", {}).get("agreement"), "pairs": s["pairs"],
                                "length_ratio": s["length_ratio"]} for s in summary]}
    if method == "vlm_rlaif" and variant != "-control":
        stats = read_json(seed_dir / (method + variant) / "prefs" / "stats.json")
        return {"iterations": [{"agreement": stats.get("oracle_agreement", {}).get("agreement"), "pairs": stats["pairs"],
                                "length_ratio": stats["length_ratio"]}]}
    return {}


def run_gym(out="runs/gym", budget: GymBudget = PERCEPTION, seeds=(0, 1, 2), progress: bool = False,
            command: str = "vlmalign gym", jobs: int = 1) -> list[dict]:
    """The benchmark once, then every seed (OUT/seed-N/), `jobs` seeds at a time in processes of
    their own; the table in OUT/gym.md and OUT/gym.json."""
    out = Path(out)
    if jobs < 1:
        raise VlmalignError(f"jobs: at least 1 (got {jobs})")
    if budget.family not in FAMILIES:
        raise VlmalignError(f"family: {budget.family!r} is not one of {', '.join(FAMILIES)}")
    if (budget.frame_grid != 1 or budget.visual_positions) and budget.family != "video_lm":
        raise VlmalignError(f"frame_grid, visual_positions: vlmalign's VideoLM's pooling (the grid and perception "
                            f"designs'); {budget.family} pools and places each frame as its checkpoint does: give "
                            "--design pooled or quick")
    _check_settings(out, budget)
    bench = out / "bench"
    with one_writer(out / ".bench.lock"):
        if not (bench / "manifest.json").is_file():
            write_benchmark(bench, budget, progress)
    runs = run_seeds(out, budget, list(seeds), bench, progress, jobs)
    manifest = read_json(bench / "manifest.json")
    text = format_gym(runs, manifest, budget, command)
    (out / "gym.md").write_text(text + "\n")
    write_json(out / "gym.json", {"budget": asdict(budget), "command": command, "seeds": runs}, indent=2)
    print("\n" + text + f"\n\nresults: {out / 'gym.md'}", flush=True)
    from vlmalign.plots import MissingMatplotlib, plot_gym_tau

    try:
        figure = plot_gym_tau(out, out / "gym_tau.png")
        if figure is not None:
            print(f"Kendall tau over training: {figure}", flush=True)
    except MissingMatplotlib as e:
        print(f"no tau curves: {e}", flush=True)
    return runs


def write_benchmark(bench: Path, budget: GymBudget, progress: bool) -> None:
    """The budget's benchmark, with its declared misalignment, in `bench`."""
    from vlmalign.data.synthetic import Misalignment, generate_benchmark

    print(f"[gym] benchmark: {budget.videos} videos, prior rate {budget.prior_rate}, invent rate "
          f"{budget.invent_rate}, runner-up rate {budget.runner_up_rate}", flush=True)
    generate_benchmark(bench, num_videos=budget.videos, seed=budget.bench_seed, splits=budget.splits,
                       max_objects=budget.max_objects,
                       misalignment=Misalignment(budget.prior_rate, budget.invent_rate, budget.runner_up_rate),
                       progress=progress)


def run_seeds(out: Path, budget: GymBudget, seeds: list[int], bench: Path, progress: bool, jobs: int) -> list[dict]:
    """Every seed's results, in seed order: one after another in this process, or `jobs` at a time
    in spawned processes that split this process's torch threads. Tiny models gain little from a
    second thread, so on a few cores seeds side by side finish sooner than seeds in turn, once a
    seed's run outlasts the seconds a spawned process takes to start (docs/performance.md)."""
    workers = min(jobs, len(seeds))
    if workers == 1:
        return [run_seed(out / f"seed-{s}", budget, s, bench, out / "feature_cache", progress) for s in seeds]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    import torch

    threads = max(1, torch.get_num_threads() // workers)
    print(f"[gym] seeds {', '.join(map(str, seeds))}: {workers} at a time, {threads} torch thread(s) each", flush=True)
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_seed_process, initargs=(threads,)) as pool:
            # progress bars of side-by-side seeds would overwrite each other: their stage lines say it
            futures = [pool.submit(run_seed, out / f"seed-{s}", budget, s, bench, out / "feature_cache", False)
                       for s in seeds]
            return [f.result() for f in futures]
    except BrokenProcessPool:
        raise VlmalignError(
            "gym: a seed's process died (out of memory, or, when run_gym is called from a script without "
            "`if __name__ == \"__main__\":`, at start: seeds are spawned and re-import the script); guard the "
            "call, or run the seeds in turn (jobs=1); finished stages are kept and reused") from None


def _seed_process(threads: int) -> None:
    """A spawned seed's process: its share of the threads, and no library noise (as the CLI)."""
    import torch

    from vlmalign.cli import quiet_libraries

    torch.set_num_threads(threads)
    quiet_libraries()


def _check_settings(out: Path, budget: GymBudget) -> None:
    """Every stage reuses what it finds finished, so a folder holds one budget: the first run records
    it (with the benchmark generator's version) and a run with other settings is refused. The
    methods may differ: each has its own folder. A field added to `GymBudget` after a folder was
    made reads as its default there: a new field's default is what the runs before it did."""
    from vlmalign.data.synthetic import GENERATOR_VERSION

    def recordable(b: GymBudget) -> dict:
        return {k: v for k, v in json.loads(json.dumps(asdict(b))).items() if k != "methods"}

    settings = {**recordable(budget), "generator": GENERATOR_VERSION}
    path = out / "gym-settings.json"
    if path.is_file():
        recorded = {**recordable(GymBudget()), **read_json(path)}
        changed = sorted(k for k in settings.keys() | recorded.keys() if settings.get(k) != recorded.get(k))
        if changed:
            raise VlmalignError(f"{out} holds a gym run with other settings ({', '.join(changed)}); "
                                "use another --out, or remove the folder")
        return
    if out.exists() and any(out.iterdir()):
        raise VlmalignError(f"{out} is not empty and holds no gym run ({path.name} is missing); use another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, settings, indent=2)


def gains(runs: list[dict], name: str, column: str = "all") -> list[float]:
    """Points gained over each seed's own start (seeds where the run failed are left out)."""
    return [100 * (r[name][column] - r["start"][column]) for r in runs if column in r.get(name, {})]


def format_gym(runs: list[dict], manifest: dict, budget: GymBudget, command: str) -> str:
    def cell(values, signed=False, digits=1):
        values = [v for v in values if v is not None]
        if not values:
            return "n/a"
        mean, sd = mean_std(values)
        text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
        return text + (f" ± {sd:.{digits}f}" if len(values) > 1 else "")

    columns = (*QTYPES, "all", "truth = prior", "truth != prior", "prior stated")
    m = manifest["misalignment"]
    runner_ups = sum(m.get("runner_up_sft_answers", {}).values())
    altered = sum(v for k, v in m["altered_sft_answers"].items() if k != "describe") - runner_ups
    short = sum(v for k, v in m["sft_answers"].items() if k != "describe")
    runner_up = (f", {runner_ups} its runner-up (runner-up rate {m['runner_up_rate']})" if runner_ups else "")
    n_test = manifest["files"]["qa_test.json"]["records"]
    seeds = [r["seed"] for r in runs]
    lines = [
        f"# Alignment gym: `{command}`",
        "",
        f"Declared misalignment (the same for every method): prior rate {m['prior_rate']}, invent rate "
        f"{m['invent_rate']}; {altered} of {short} short SFT answers state the question's prior instead of the truth"
        f"{runner_up}, "
        f"{m['altered_sft_answers'].get('describe', 0)} of {m['sft_answers'].get('describe', 0)} descriptions gain an "
        f"invented object. Held-out accuracy (%) on {n_test} questions (greedy, oracle-judged), mean ± sd over seeds "
        f"{seeds}; gain in points over each seed's own start; prior stated: where truth != prior, the answers that "
        f"still state the prior.",
        "",
        "| model | " + " | ".join(columns) + " | gain (all) |",
        "|---|" + "---|" * (len(columns) + 1),
    ]
    for name, label in ROWS.items():
        if name not in runs[0]:
            continue
        cols = [cell([100 * r[name][q] for r in runs if r.get(name, {}).get(q) is not None]) for q in columns]
        gain = "" if name in ("perception", "ceiling", "start") else cell(gains(runs, name), signed=True)
        lines.append(f"| {label} | " + " | ".join(cols) + f" | {gain} |")
    for r in runs:
        for name, row in r.items():
            if isinstance(row, dict) and "failed" in row:
                lines.append(f"\nseed {r['seed']}, {ROWS.get(name, name).strip()}: failed: {row['failed']}")
    samples = [r["start_samples"] for r in runs if r.get("start_samples")]
    if samples:
        lines += ["", f"The start's own samples ({samples[0]['k']} per training question at T = 1, "
                  f"{samples[0]['questions']} questions): pass@{samples[0]['k']} "
                  f"{cell([100 * s['pass_at_k'] for s in samples])}%, correct share {cell([100 * s['correct_share'] for s in samples])}%."]
    taus = [(ROWS[name].strip(), [r[name] for r in runs if "tau_first" in r.get(name, {})]) for name in ROWS]
    taus = [(label, rows) for label, rows in taus if rows]
    if taus:
        lines += ["", "Kendall tau of the policy's ranking against the judge's, first -> last logged rollout: " + "; ".join(
            f"{label} {cell([row['tau_first'] for row in rows], True, 2)} -> {cell([row['tau_last'] for row in rows], True, 2)}"
            for label, rows in taus) + "."]
    probes = [r["reader_probe"] for r in runs if r.get("reader_probe")]
    if probes:
        lines += ["", f"Reader judge (likelihood, text only): accuracy on a true and a wrong answer to each held-out question "
                  f"({probes[0]['none']['n']} pairs), by what it read: " + "; ".join(
                      f"{ctx} {cell([100 * p[ctx]['accuracy'] for p in probes if p[ctx]['accuracy'] is not None])}%"
                      + (" (" + ", ".join(f"{t} {cell([100 * p[ctx]['by_type'][t] for p in probes if p[ctx]['by_type'].get(t) is not None], digits=0)}"
                                          for t in probes[0][ctx]["by_type"]) + ")" if probes[0][ctx].get("by_type") else "")
                      for ctx in probes[0]) + "."]
    for name, label in ROWS.items():
        per_seed = [r[name]["iterations"] for r in runs if "iterations" in r.get(name, {})]
        if not per_seed:
            continue
        steps = []
        for i in range(max(len(its) for its in per_seed)):
            at = [its[i] for its in per_seed if len(its) > i]
            agreement = cell([100 * a["agreement"] for a in at if a["agreement"] is not None])
            steps.append(f"{'iteration ' + str(i + 1) + ': ' if len(per_seed[0]) > 1 else ''}agreement "
                         f"{agreement}{'' if agreement == 'n/a' else '%'}, length ratio "
                         f"{cell([a['length_ratio'] for a in at if a['length_ratio'] is not None], digits=2)}")
        lines += ["", f"{label.strip()}: judge agreement with the oracle on the pairs it judged, chosen/rejected length "
                  f"ratio: " + "; ".join(steps) + "."]
    lines += ["", f"Gap (ceiling - start): {cell([100 * (r['ceiling']['all'] - r['start']['all']) for r in runs], signed=True)} points. "
              f"Minutes per seed (wall time of every run in its folder, summed): {', '.join(str(r['minutes']) for r in runs)}."]
    return "\n".join(lines)
