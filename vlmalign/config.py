"""One config schema: typed dataclasses per stage, loaded from YAML with strict validation.

A stage config is a dataclass of sections (`model`, `data`, `train`, ...). YAML files may include
other files with `base:` (a path or a list, relative to the including file; later ones win, the
including file wins over all), and every command accepts `--set a.b=value` overrides. Unknown keys,
wrong types and missing required fields raise `ConfigError` naming the key, the file it came from
and, for unknown keys, the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from vlmalign.errors import ConfigError

LLAMA_LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
@dataclass
class VisionConfig:
    backend: Literal["hf", "open_clip"] = "hf"
    # HF name or local path of a CLIP vision model (e.g. openai/clip-vit-large-patch14-336), or an
    # open_clip "MODEL/PRETRAINED" pair. None builds a random-initialised tower from `arch`.
    pretrained: str | None = None
    arch: dict[str, Any] = field(default_factory=dict)  # CLIPVisionConfig fields for random init
    select_layer: int = -2  # LLaVA uses the penultimate layer
    frozen: bool = True


@dataclass
class LLMConfig:
    pretrained: str | None = None  # any AutoModelForCausalLM name or path; None: random init from `arch`
    arch: dict[str, Any] = field(default_factory=dict)  # LlamaConfig fields for random init
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False


@dataclass
class TokenizerConfig:
    pretrained: str | None = None  # defaults to llm.pretrained
    # Tiny models: build a word-level tokenizer from the words in these files (plus the packaged
    # prompts), so nothing is downloaded. Used only when no pretrained tokenizer is given.
    word_corpus: list[str] = field(default_factory=list)


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_LINEAR_MODULES))


@dataclass
class QuantizationConfig:
    load_in_4bit: bool = False  # QLoRA: bitsandbytes 4-bit base weights (llm.pretrained or model.init_from)
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


@dataclass
class ModelConfig:
    # Start from a saved vlmalign model (a run's final/ or checkpoint) or an HF `llava-hf` LLaVA-1.5
    # checkpoint; the sections below then describe only what changes (e.g. a new LoRA).
    init_from: str | None = None
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    projector: Literal["mlp2x_gelu", "mlp2x_relu", "linear"] = "mlp2x_gelu"
    # Video-ChatGPT spatio-temporal mean pooling: VLM-RLAIF pools after the projector (T + P
    # tokens of LLM width), Video-ChatGPT before a linear projector.
    pooling: Literal["after_projector", "before_projector"] = "after_projector"
    # Each frame's temporal tokens: 1 is Video-ChatGPT's one mean per frame; g keeps each frame as a
    # g x g grid of patch means (g^2 tokens a frame), the position per frame that the direction of
    # motion needs (docs/results.md, the perception probe). It must divide the side of the patch grid.
    frame_grid: int = 1
    # A learned embedding per visual token slot, added to the pooled, projected tokens: it tells the
    # LLM which frame and which cell a token is, where RoPE gives only offsets between tokens. A
    # reader of the tiny model's size needed such positions to learn direction; in the gym's SFT
    # they were not enough (docs/results.md, "The grid design").
    visual_positions: bool = False
    num_frames: int = 50
    frame_sampling: Literal["linspace", "segments"] = "linspace"
    # HF video models: with `fps`, read that many frames per second of video instead of num_frames,
    # evenly spaced, at least min_frames and at most max_frames (a long video gets sparser frames)
    fps: float | None = None
    min_frames: int = 4
    max_frames: int = 64
    # the rate a frame folder's (or image list's) frames were taken at: video files carry their own;
    # fps sampling and the timestamps of Qwen2.5-VL / Qwen3-VL need one
    frame_folder_fps: float | None = None
    # HF video models: at most this many visual tokens per video; with `fps`, a video that would get
    # more reads fewer frames (down to min_frames), with `num_frames` it is an error (null: no budget)
    max_visual_tokens: int | None = None
    # Qwen2-VL / Qwen2.5-VL / Qwen3-VL: at most this many pixels over all frames read of one video
    # (frames x height x width); a video over it reads each frame smaller than frame_size, its aspect
    # kept, each side rounded down to whole merged patches (28; 32 for Qwen3-VL), never below one;
    # a video that does not fit even then is an error (null: every frame at frame_size)
    max_video_pixels: int | None = None
    # HF video models: every frame is resized to [height, width]; Qwen: multiples of the checkpoint's
    # patch x merge size (28; 32 for Qwen3-VL), a video of n frames gives n / 2 x (h / 28) x (w / 28)
    # tokens; LLaVA-OneVision: its vision tower's size (384), n x 196 + 1 tokens
    frame_size: list[int] = field(default_factory=lambda: [336, 336])
    train_projector: bool = True
    lora: LoraConfig = field(default_factory=LoraConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    gradient_checkpointing: bool = False


# ---------------------------------------------------------------------------------------------
# Data, training mechanics, run
# ---------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # data files (any supported format)
    eval: list[str] = field(default_factory=list)
    video_root: str | None = None  # relative video paths resolve here, else next to the data file
    max_length: int = 2048  # tokens incl. visual tokens; longer prompts are an error, never truncated
    # CLIP features of each video are computed once and stored here (safetensors); null disables.
    feature_cache: str | None = "runs/feature_cache"


@dataclass
class TrainConfig:
    epochs: int = 1
    # SFT, DPO, RM: a cap on the optimizer steps `epochs` gives (it never lengthens a run); PPO and
    # GRPO_rank: the number of rollouts, over as many epochs as that takes
    max_steps: int | None = None
    batch_size: int = 4  # per process
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.03
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    log_every: int = 10
    save_every: int = 200  # optimizer steps between atomic checkpoints
    keep_checkpoints: int = 2
    tensorboard: bool = False


@dataclass
class RunConfig:
    dir: str = "runs/default"  # everything the stage writes goes here; re-running resumes from it
    resume: bool = True
    progress: bool = True


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------
@dataclass
class CurriculumConfig:
    # answer_length: split the training data into easy (short answers) and hard stages by the
    # answer's word count; files: each data.train file is one stage, in order; none: one mixture.
    criterion: Literal["answer_length", "files", "none"] = "none"
    stages: list[str] = field(default_factory=lambda: ["easy", "hard"])
    threshold: int | None = None  # words; None: the median answer length
    epochs_per_stage: int = 1


@dataclass
class JudgeConfig:
    # oracle: the synthetic benchmark's rule-based judge (needs `bench`); hf: a local VideoLM
    # (`model`: a saved vlmalign/llava-hf path, or "policy" for the model being trained);
    # openai: any OpenAI-compatible endpoint.
    # random: the negative control, verdicts drawn at random (`seed`).
    # reward: a reward model trained by `train-rm` (`model`: its folder) scores and ranks by reward.
    # likelihood: a local model (`model` as for hf) prefers the answer it finds likelier after the
    # context and the question (a reader judge: `vlmalign gym` trains one on captions).
    backend: Literal["oracle", "hf", "likelihood", "openai", "random", "reward"] = "oracle"
    model: str | None = None  # hf: model path; openai: the pinned model id; reward: the reward model folder
    bench: str | None = None  # oracle: the synthetic benchmark folder (metadata.jsonl)
    base_url: str | None = None  # openai: endpoint; None = the client's default
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never from config
    temperature: float = 0.0
    max_new_tokens: int = 64
    concurrency: int = 8  # openai: requests in flight
    max_retries: int = 5  # per request, on 429 / 5xx / timeouts
    reask: int = 1  # times an unreadable reply is asked again, with the reply and a format reminder
    backoff_base: float = 1.0  # seconds; doubled per retry, with jitter
    timeout: float = 60.0  # seconds per request
    batch_size: int = 8  # hf: prompts per generate call; reward: answers per forward pass
    max_length: int = 2048  # reward, likelihood: tokens of one answer's input, visual tokens included
    read_video: bool = True  # hf, likelihood: show the judge model the video; false: it reads context and question only
    swap_check: bool = False  # compare: judge (A,B) and (B,A), keep consistent verdicts only
    # likelihood, reward: compare calls a tie (no preference pair) when the two answers' scores differ
    # by less than this (log-probability in nats, or reward); 0: the higher score always wins.
    tie_margin: float = 0.0
    explain: bool = False  # score: a short explanation, then "Score: N" (LLaVA-Hound's judge)
    prompts: str | None = None  # a user prompt YAML file or folder overriding the packaged ones
    cache: str | None = None  # SQLite file; None = <run dir>/judge_cache.sqlite
    seed: int = 0  # random: the seed of its verdicts


@dataclass
class SamplingConfig:
    num_samples: int = 2  # answers per question (G)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 8  # questions per forward pass, each with its num_samples answers


@dataclass
class ContextConfig:
    # What the judge reads besides the question and answers. none: nothing; narrative: the policy's
    # clip captions joined (VLM-RLAIF); caption: a given detailed caption, the video's proxy
    # (LLaVA-Hound; from `captions`); retrospective: ISR-DPO's refined context (iterative DPO).
    kind: Literal["none", "narrative", "caption", "retrospective"] = "none"
    clips: int = 3  # narrative: clips per video (each at most max_clip_len frames)
    max_clip_len: int = 20
    captions: str | None = None  # caption: file of detailed captions per video
    max_new_tokens: int = 96  # narrative / retrospective: caption length


@dataclass
class PreferenceConfig:
    # pairwise (VLM-RLAIF): the judge picks one of 2 answers; score_threshold (LLaVA-Hound): answers
    # scored 1-5, chosen >= chosen_min and rejected <= rejected_max drawn at random; ranked
    # (Oracle-RLAIF): the judge ranks all answers.
    method: Literal["pairwise", "score_threshold", "ranked"] = "pairwise"
    chosen_min: int = 3
    rejected_max: int = 2
    oracle: str | None = None  # a synthetic benchmark folder: report judge agreement with its oracle
    limit: int | None = None  # first N questions only


@dataclass
class PrefsConfig:
    run: RunConfig = field(default_factory=RunConfig)
    policy: str = ""  # the model that answers (a saved vlmalign model, e.g. runs/tiny-sft/final)
    data: DataConfig = field(default_factory=DataConfig)  # data.train: the question files
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    preferences: PreferenceConfig = field(default_factory=PreferenceConfig)
    seed: int = 0


@dataclass
class DPOSection:
    beta: float = 0.1
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = 0.0
    sft_weight: float = 0.0  # weight of an SFT (token-mean NLL) term on the chosen answers
    average_logps: bool = False  # False: summed sequence log-probs (the papers); True: per-token mean


@dataclass
class LoopConfig:
    # Iterative DPO (ISR-DPO): per iteration, the current policy answers `questions`, a context is
    # written per `context_mode`, the judge (usually the policy itself) builds preferences, and DPO
    # trains the next policy with the current one as reference. iterations 0: offline DPO on data.train.
    iterations: int = 0
    questions: list[str] = field(default_factory=list)
    limit: int | None = None  # first N questions only
    context_mode: Literal["none", "fixed", "renew", "retrospective"] = "retrospective"
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(num_samples=2, temperature=0.7))
    judge: JudgeConfig = field(default_factory=lambda: JudgeConfig(backend="hf", model="policy"))
    preferences: PreferenceConfig = field(default_factory=PreferenceConfig)
    eval_qa: str | None = None  # synthetic-benchmark QA file: held-out accuracy after each iteration
    eval_limit: int | None = None


@dataclass
class DPOConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # model.init_from: the starting policy
    data: DataConfig = field(default_factory=DataConfig)  # data.train: preference files (offline DPO)
    train: TrainConfig = field(default_factory=TrainConfig)
    dpo: DPOSection = field(default_factory=DPOSection)
    loop: LoopConfig = field(default_factory=LoopConfig)


@dataclass
class GRPOSection:
    # The advantage estimator (`losses.ADVANTAGE_ESTIMATORS`). grpo_rank (Oracle-RLAIF): the judge
    # ranks the G answers; advantage = group-mean delta - delta, delta = 1 - nDCG of the policy's
    # log-prob ranking against the judge's. grpo_rank_monotone: the judge's rank gain plus half that
    # term, so a better-ranked answer always gains more. grpo: the judge scores each answer 1-5;
    # advantage = (score - group mean) / group std; dr_grpo: without the std.
    advantage: Literal["grpo_rank", "grpo_rank_monotone", "grpo", "dr_grpo"] = "grpo_rank"
    dcg: Literal["table", "eq10"] = "table"
    logp_order: Literal["sum", "mean"] = "sum"  # the policy's ranking: summed or mean token log-probs
    rollout_batch: int = 64  # prompts per rollout (each with sampling.num_samples answers)
    mini_batch: int = 16  # sequences per forward/backward within an optimisation pass
    num_iterations: int = 1  # optimisation passes over each rollout batch
    clip: float = 0.2
    beta: float = 0.04  # KL coefficient to the frozen reference (k3 estimator); 0 disables it
    c_entropy: float = 0.0  # entropy bonus coefficient
    # The policy loss (`losses.GRPO_LOSSES`): bnpo (mean over the update's answer tokens), grpo (mean
    # within each answer, then over answers: Oracle-RLAIF's Eq. 6), dapo (token sum over the rollout's
    # mean tokens per update), dr_grpo (token sum over answers x sampling.max_new_tokens).
    loss: Literal["bnpo", "grpo", "dapo", "dr_grpo"] = "bnpo"
    clip_high: float | None = None  # upper ratio clip (DAPO's clip-higher, e.g. 0.28); None: clip
    ratio: Literal["token", "sequence"] = "token"  # sequence: one geometric-mean ratio per answer (GSPO)
    # The KL term's reference: start (the frozen starting policy) or epoch (Oracle-RLAIF's Algorithm 1:
    # the policy as it was when the current pass over the questions began, reset every pass).
    reference: Literal["start", "epoch"] = "start"
    # DAPO's dynamic sampling: groups whose advantages are all zero (no reward spread, or a failed
    # judgment) are dropped, and up to max_sampling_rounds - 1 further batches of rollout_batch
    # questions, drawn at random, are sampled and judged to fill the rollout.
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3


@dataclass
class GRPOConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # model.init_from: the starting policy (= reference)
    data: DataConfig = field(default_factory=DataConfig)  # data.train: question files
    train: TrainConfig = field(default_factory=TrainConfig)  # epochs: passes over the questions
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(num_samples=5))
    # what the ranker reads besides question and answers: none, caption (a caption file, the video's
    # proxy for a text-only ranker) or narrative (the starting policy's clip captions, written once)
    context: ContextConfig = field(default_factory=ContextConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    eval_qa: str | None = None  # synthetic-benchmark QA file: held-out accuracy at the end
    eval_limit: int | None = None


@dataclass
class RMSection:
    center_coef: float = 1e-3  # weight of VLM-RLAIF's |mean(r_a + r_b)| term that keeps rewards near 0
    # Held-out pairs for the accuracy of r_chosen > r_rejected: data.eval when given, else this share
    # of data.train (drawn with train.seed); 0 with no data.eval: no evaluation.
    eval_fraction: float = 0.0
    eval_every: int = 0  # optimizer steps between evaluations (and one before the first); 0: at the end only
    prompts: str | None = None  # a user YAML file or folder overriding the packaged reward.evaluate


@dataclass
class RMConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # model.init_from: the SFT policy (the backbone)
    data: DataConfig = field(default_factory=DataConfig)  # data.train / data.eval: preference files
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-5))
    rm: RMSection = field(default_factory=RMSection)


@dataclass
class PPOSection:
    # Defaults: VLM-RLAIF's released PPO (AlpacaFarm style; CONVENTIONS section 3).
    rollout_batch: int = 256  # questions per rollout, each with sampling.num_samples answers
    step_batch: int = 128  # answers per optimizer step
    micro_batch: int = 8  # answers per forward pass (gradients accumulate up to step_batch)
    ppo_epochs: int = 2  # optimisation passes over each rollout
    clip: float = 0.2  # policy ratio clip
    value_clip: float = 0.2  # how far a value prediction may move from the rollout's before its loss is clipped
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 1.0
    kl_coef: float = 0.1  # per-token k1 penalty to the starting policy
    clamp_kl: bool = True  # floor each token's k1 estimate at 0, as the released code does
    # Adaptive KL (Ziegler et al. 2019): move kl_coef towards this per-answer KL over kl_horizon
    # answers; null keeps kl_coef fixed.
    kl_target: float | None = None
    kl_horizon: int = 10000
    # The shaped per-token rewards (score and KL term together) are whitened, keeping their mean, or
    # multiplied by reward_scale.
    whiten_rewards: bool = False
    reward_scale: float = 10.0
    eos_penalty: float = -8.0  # added to the score of an answer cut at sampling.max_new_tokens
    length_coef: float = -10.0  # score += length_coef * answer tokens / sampling.max_new_tokens; 0: off
    whiten_advantages: bool = True


@dataclass
class PPOConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # model.init_from: the SFT policy (= reference)
    # Where each answer's score comes from: "reward_model" (VLM-RLAIF: the `train-rm` model below) or
    # "judge" (`judge`'s 1-5 score, e.g. the oracle's: PPO on a rule-based reward, which tells what a
    # reward model's errors cost from what PPO itself does).
    reward: Literal["reward_model", "judge"] = "reward_model"
    # a `train-rm` final/: scores answers (reward: reward_model) and a trainable copy of it is the value
    # model; with reward: judge it is optional, and without it the value model is the policy with a new head
    reward_model: str = ""
    judge: JudgeConfig = field(default_factory=JudgeConfig)  # reward: judge
    data: DataConfig = field(default_factory=DataConfig)  # data.train: question files
    train: TrainConfig = field(default_factory=TrainConfig)  # epochs: passes over the questions; max_steps, save_every: rollouts
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(num_samples=1, temperature=1.0, max_new_tokens=896))
    ppo: PPOSection = field(default_factory=PPOSection)
    eval_qa: str | None = None  # synthetic-benchmark QA file: held-out accuracy at the end
    eval_limit: int | None = None


@dataclass
class InstructionsConfig:
    run: RunConfig = field(default_factory=RunConfig)
    captions: str = ""  # file of detailed captions per video (see feedback.context.load_captions)
    # The LLM that writes the questions: any backend with free generation (openai or hf, not oracle).
    judge: JudgeConfig = field(default_factory=lambda: JudgeConfig(backend="openai", max_new_tokens=512))
    pairs_per_caption: int = 3
    limit: int | None = None  # first N captions only
    # Records name videos <video_root>/<stem>.mp4 (None: <stem>.mp4); readers resolve relative
    # names against the instruction file's folder, i.e. run.dir.
    video_root: str | None = None


@dataclass
class SFTConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
_BASE_KEYS = ("base", "defaults")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(dst: dict, src: dict, origin: dict, source: str, prefix: str = "") -> None:
    """Deep-merge `src` into `dst`, recording which file set each dotted key."""
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, origin, source, dotted + ".")
        else:
            dst[key] = value
            origin[dotted] = source


def _load_with_bases(path: Path, origin: dict, seen: tuple = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular base include")
    data = _read_yaml(path)
    bases = None
    for key in _BASE_KEYS:
        if key in data:
            bases = data.pop(key)
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else (bases or []):
        _merge(merged, _load_with_bases(path.parent / base, origin, seen + (path,)), origin, str(path.parent / base))
    _merge(merged, data, origin, str(path))
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _apply_override(data: dict, keys: list[str], value: Any, origin: dict) -> None:
    node = data
    for key in keys[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[keys[-1]] = value
    origin[".".join(keys)] = "--set"


def _where(origin: dict, dotted: str) -> str:
    """The file (or --set) that set `dotted` or its nearest parent."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in origin:
            return origin[".".join(parts[:i])]
    return "defaults"


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _convert(value: Any, tp: Any, dotted: str, origin: dict) -> Any:
    origin_tp = typing.get_origin(tp)
    where = _where(origin, dotted)

    def fail(expected: str) -> typing.NoReturn:
        raise ConfigError(f"{dotted}: expected {expected}, got {type(value).__name__} {value!r} (from {where})")

    if tp is Any:
        return value
    if origin_tp in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            fail(" or ".join(_type_name(a) for a in args))
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for arg in non_none:
            try:
                return _convert(value, arg, dotted, origin)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin_tp is Literal:
        if value not in typing.get_args(tp):
            close = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            fail(f"one of {_type_name(tp)}{hint}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail(f"a mapping for section {tp.__name__}")
        return _build(tp, value, dotted + ".", origin)
    if origin_tp is list:
        if not isinstance(value, list):
            fail("a list")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{dotted}[{i}]", origin) for i, v in enumerate(value)]
    if origin_tp is dict:
        if not isinstance(value, dict):
            fail("a mapping")
        _, val_tp = typing.get_args(tp)
        return {str(k): _convert(v, val_tp, f"{dotted}.{k}", origin) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if tp is float:
        # YAML 1.1 reads `1e-4` (no dot) as a string; accept numeric strings for float fields.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                fail("a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    raise TypeError(f"unsupported config type {tp} at {dotted}")


def _build(cls: type, data: dict, prefix: str, origin: dict) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            valid = ", ".join(fields)
            raise ConfigError(
                f"unknown key '{prefix}{key}' in {_where(origin, prefix + str(key))}{hint}; valid keys: {valid}"
            )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], prefix + name, origin)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{prefix}{name}' (in {_where(origin, prefix.rstrip('.'))})")
    return cls(**kwargs)


T = typing.TypeVar("T")


def load_config(schema: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load `schema` from a YAML file (with `base:` includes) and `a.b=value` overrides."""
    origin: dict[str, str] = {}
    data = _load_with_bases(Path(path), origin) if path else {}
    for text in overrides or []:
        keys, value = parse_override(text)
        _apply_override(data, keys, value, origin)
    return _build(schema, data, "", origin)


def config_from_dict(schema: type[T], data: dict, source: str = "dict") -> T:
    origin = {key: source for key in data}
    return _build(schema, data, "", origin)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
