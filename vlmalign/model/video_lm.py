"""The video LLM: CLIP vision tower -> (pool, project | project, pool) -> visual tokens spliced into
an `AutoModelForCausalLM` at the `<video>` slots.

Saved layout (`save_pretrained`), everything in safetensors:
    model.json            the ModelConfig plus where each component's weights come from
    tokenizer/            always
    projector.safetensors always
    visual_positions.safetensors   with `model.visual_positions`
    vision/               unless the tower is a frozen pretrained one (then it is referenced)
    llm/                  full LLM weights when trained without LoRA or randomly initialised
    adapter/              the LoRA adapter, when LoRA is on (the base is then referenced)
A LoRA model started from another saved model records that model's path as its base; loading
rebuilds the base (merging its adapter, if any) and applies this adapter.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlmalign.config import ModelConfig, QuantizationConfig, config_from_dict, to_dict
from vlmalign.data import template
from vlmalign.data.formats import read_json
from vlmalign.data.template import VISUAL_TOKEN_ID
from vlmalign.errors import ConfigError
from vlmalign.model.generation import DecodeState, cache_name, left_positions
from vlmalign.model.policy import MANIFEST, Policy
from vlmalign.model.projector import build_projector, frame_grid_fits, spatio_temporal_pool
from vlmalign.model.tokenizer import load_tokenizer
from vlmalign.model.vision import VisionTower

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class VideoLM(Policy):
    """The policy interface (`model/policy.py`) on our own video LLM: the vicuna_v1 template, a fixed
    number of visual slots per video (`VISUAL_TOKEN_ID`), features or frames per video."""

    visual_slot_id = VISUAL_TOKEN_ID
    unsampled_token_ids: tuple[int, ...] = ()  # the visual slot id is no vocabulary id: nothing to keep out

    def __init__(self, cfg: ModelConfig, vision: VisionTower, projector: nn.Module, llm: nn.Module, tokenizer, base: dict,
                 visual_positions: nn.Parameter | None = None):
        super().__init__()
        self.cfg = cfg
        self.vision = vision
        self.projector = projector
        # given when a saved or starting model has them; fresh when the config asks and none is given
        if visual_positions is None and cfg.visual_positions:
            width = llm.config.hidden_size
            visual_positions = nn.Parameter(0.5 * torch.randn(self._token_count(cfg, vision), width,
                                                              dtype=_DTYPES[cfg.llm.dtype]))
        if visual_positions is not None and visual_positions.shape[0] != self._token_count(cfg, vision):
            raise ConfigError(f"model.num_frames: {cfg.num_frames} frames give {self._token_count(cfg, vision)} visual "
                              f"tokens, but the model's visual positions are learnt for {visual_positions.shape[0]}")
        self.visual_positions = visual_positions
        self.llm = llm
        self.tokenizer = tokenizer
        self.base = base  # where the LLM base weights come from: {"pretrained": name} | {"checkpoint": path} | {}
        if not frame_grid_fits(vision.num_patches, cfg.frame_grid):
            side = math.isqrt(vision.num_patches)
            raise ConfigError(f"model.frame_grid: {cfg.frame_grid} does not divide the vision tower's "
                              f"{side} x {side} patch grid into equal cells")

    # --- the policy interface ------------------------------------------------------------------
    def encode_conversation(self, turns, max_length: int, sample_id: str = "", layout=None) -> template.Encoded:
        return template.encode_conversation(self.tokenizer, turns, self.num_visual_tokens, max_length, sample_id)

    def encode_prompt(self, question: str, layout=None) -> list[int]:
        return template.encode_prompt(self.tokenizer, question, self.num_visual_tokens)

    def encode_followup(self, turns, text: str, max_length: int, sample_id: str = "", layout=None) -> list[int]:
        """The conversation, then `USER: {text} ASSISTANT:`; the conversation is cut first, so the
        last turn (a reward model's evaluation prompt) always stays whole."""
        tail = self.tokenizer(f"USER: {text} ASSISTANT:", add_special_tokens=False).input_ids
        return self.encode_conversation(turns, max_length - len(tail), sample_id).input_ids + tail

    def visual_inputs(self, cache_dir):
        from vlmalign.data.features import VisualInputs

        return VisualInputs(self, cache_dir)

    def stack_visual(self, items: list[torch.Tensor]) -> dict:
        """Per-video features [T, P, D] (frozen tower) or frames [T, 3, S, S] -> the batch's entry."""
        return {"features" if self.cfg.vision.frozen else "pixels": torch.stack(items)}

    def _features(self, visual: dict, device) -> torch.Tensor | None:
        if "features" in visual:
            return visual["features"].to(device)
        if "pixels" in visual:  # the tower trains: run it inside the step
            return self.video_features(visual["pixels"].to(device))
        return None

    def model_inputs(self, batch: dict, device) -> dict:
        return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
                "features": self._features(batch, device)}

    def prefill(self, input_ids, attention_mask, visual: dict) -> tuple[torch.Tensor, DecodeState]:
        positions = left_positions(attention_mask)
        out = self.llm(inputs_embeds=self.embed(input_ids, self._features(visual, input_ids.device)),
                       attention_mask=attention_mask, position_ids=positions, use_cache=True)
        return out.logits[:, -1], DecodeState(getattr(out, cache_name(self.llm)), positions[:, -1] + 1)

    def extend(self, tokens, attention_mask, state: DecodeState) -> torch.Tensor:
        return state.step(self.llm, tokens, attention_mask, state.next_positions(tokens.shape[1]))

    def adapted_module(self):
        return self.llm

    @property
    def language_model(self):
        return self.llm

    def frame_settings(self) -> dict:
        return {"model": "VideoLM", "num_frames": self.cfg.num_frames, "frame_sampling": self.cfg.frame_sampling,
                "visual_tokens": self.num_visual_tokens}

    def hidden_states(self, input_ids, attention_mask, features=None) -> torch.Tensor:
        # the decoder alone: the LM head's [B, L, vocab] logits would be computed and thrown away
        return self.llm.get_decoder()(inputs_embeds=self.embed(input_ids, features), attention_mask=attention_mask,
                                      use_cache=False).last_hidden_state

    # --- visual tokens -------------------------------------------------------------------------
    @property
    def num_visual_tokens(self) -> int:
        return self._token_count(self.cfg, self.vision)

    @staticmethod
    def _token_count(cfg: ModelConfig, vision: VisionTower) -> int:
        return cfg.num_frames * cfg.frame_grid**2 + vision.num_patches

    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters()).device

    def video_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, T, 3, S, S] frames -> [B, T, P, D] vision features (what the feature cache stores)."""
        b, t = pixel_values.shape[:2]
        feats = self.vision(pixel_values.flatten(0, 1))
        return feats.view(b, t, *feats.shape[1:])

    def visual_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """[B, T, P, D] vision features -> [B, T * frame_grid^2 + P, H] LLM-width visual tokens."""
        features = features.to(self.projector_dtype)
        if self.cfg.pooling == "before_projector":
            tokens = self.projector(spatio_temporal_pool(features, self.cfg.frame_grid))
        else:
            tokens = spatio_temporal_pool(self.projector(features), self.cfg.frame_grid)
        return tokens if self.visual_positions is None else tokens + self.visual_positions

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def embed(self, input_ids: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with visual tokens written into the `VISUAL_TOKEN_ID` slots.

        `features` holds one video per row of `input_ids` that has visual slots, in row order.
        """
        slots = input_ids == VISUAL_TOKEN_ID
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(slots, 0))
        rows = slots.any(dim=1)
        if not rows.any():
            return embeds
        if features is None:
            raise ValueError("input has <video> slots but no video features were given")
        tokens = self.visual_tokens(features)
        per_row = slots.sum(dim=1)[rows]
        if tokens.shape[0] != int(rows.sum()) or bool((per_row != tokens.shape[1]).any()):
            raise ValueError(
                f"{int(rows.sum())} rows with {per_row.tolist()} visual slots, but features give "
                f"{tokens.shape[0]} videos x {tokens.shape[1]} tokens"
            )
        embeds = embeds.clone()
        embeds[slots] = tokens.reshape(-1, tokens.shape[-1]).to(embeds.dtype)
        return embeds

    def forward(self, input_ids, attention_mask, features=None, logits_to_keep: int = 0, **llm_kwargs):
        """Causal-LM forward; returns the LLM's output (logits [B, L, V], or of the last
        `logits_to_keep` positions). A teacher-forced pass keeps no cache unless asked (with gradient
        checkpointing transformers warns that it drops one)."""
        return self.llm(inputs_embeds=self.embed(input_ids, features), attention_mask=attention_mask,
                        logits_to_keep=logits_to_keep, **{"use_cache": False, **llm_kwargs})

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, features=None, **gen_kwargs) -> torch.Tensor:
        """Left-padded prompts -> new token ids only [B * num_return_sequences, L_new]."""
        gen_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        gen_kwargs.setdefault("eos_token_id", self.tokenizer.eos_token_id)
        return self.llm.generate(
            inputs_embeds=self.embed(input_ids, features), attention_mask=attention_mask, **gen_kwargs
        )

    # --- saving -------------------------------------------------------------------------------
    @property
    def uses_lora(self) -> bool:
        return hasattr(self.llm, "peft_config")

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path / "tokenizer")
        save_file(_contiguous(self.projector.state_dict()), path / "projector.safetensors")
        if self.visual_positions is not None:
            save_file({"visual_positions": self.visual_positions.detach().contiguous()}, path / "visual_positions.safetensors")
        saved_vision = not (self.cfg.vision.pretrained and self.cfg.vision.frozen)
        if saved_vision:
            self.vision.model.save_pretrained(path / "vision")
        if self.uses_lora:
            self.llm.save_pretrained(path / "adapter")
            if not self.base:  # random-init base: nothing to reference, so keep it
                self.llm.get_base_model().save_pretrained(path / "llm")
        else:
            self.llm.save_pretrained(path / "llm")
        manifest = {
            "family": "video_lm",
            "config": to_dict(self.cfg),
            "vision": "saved" if saved_vision else "pretrained",
            "base": self.base if self.uses_lora else {},
        }
        (path / MANIFEST).write_text(json.dumps(manifest, indent=2))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}


def _contiguous(state: dict) -> dict:
    return {k: v.detach().contiguous() for k, v in state.items()}


# ---------------------------------------------------------------------------------------------
# Building and loading
# ---------------------------------------------------------------------------------------------
def _load_llm(source: str | Path, cfg: ModelConfig):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": _DTYPES[cfg.llm.dtype], "trust_remote_code": cfg.llm.trust_remote_code}
    if cfg.quantization.load_in_4bit:
        kwargs["quantization_config"] = four_bit_config(cfg.quantization, skip=["lm_head"])
    llm = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if cfg.quantization.load_in_4bit and not torch.cuda.is_available():
        keep_cpu_4bit_trainable(llm)
    return llm


def four_bit_config(quantization: QuantizationConfig, skip: list[str]):
    """bitsandbytes' nf4/fp4 loading config; `skip`: modules kept in full precision."""
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:  # runs on CUDA, and on CPU since 0.45
        raise ConfigError("model.quantization.load_in_4bit needs bitsandbytes: pip install -e '.[qlora]'")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=_DTYPES[quantization.compute_dtype],
        llm_int8_skip_modules=skip,
    )


def keep_cpu_4bit_trainable(llm) -> None:
    """On AVX512-BF16 processors bitsandbytes repacks a Linear4bit's weight for its CPU inference
    kernel at the first eval-mode forward without gradients, and keeps it packed; that kernel has no
    backward, so every later training step would silently drop the gradient through each frozen
    4-bit layer (a QLoRA adapter would learn from part of its gradient). The weights stay in the
    layout autograd can go through; the repacking was also the only thing that refused shapes."""
    import bitsandbytes as bnb

    for module in llm.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _random_llm(cfg: ModelConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = dict(cfg.llm.arch)
    arch.setdefault("vocab_size", len(tokenizer))
    try:
        llm_config = LlamaConfig(
            **arch,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    except TypeError as exc:
        raise ConfigError(f"model.llm.arch: {exc}") from None
    return LlamaForCausalLM(llm_config).to(_DTYPES[cfg.llm.dtype])


@contextmanager
def _peft_quietly():
    """peft reads `model.is_gradient_checkpointing`, which transformers 5.x deprecates with a
    FutureWarning on every LoRA model it wraps: noise about peft's internals, not the user's setup."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def load_adapter(module, adapter_dir: Path, trainable: bool):
    """`module` with the LoRA adapter saved in `adapter_dir` (trainable further, or frozen)."""
    from peft import PeftModel

    with _peft_quietly():
        return PeftModel.from_pretrained(module, adapter_dir, is_trainable=trainable)


def _apply_lora(llm, cfg: ModelConfig):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.quantization.load_in_4bit:
        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=cfg.gradient_checkpointing)
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    with _peft_quietly():
        return get_peft_model(llm, lora)


def _set_trainable(model: VideoLM) -> VideoLM:
    cfg = model.cfg
    model.vision.requires_grad_(not cfg.vision.frozen)
    model.projector.requires_grad_(cfg.train_projector)
    if model.visual_positions is not None:  # they belong with the projector: both map vision into the LLM
        model.visual_positions.requires_grad_(cfg.train_projector)
    if not model.uses_lora:  # no adapter: the whole LLM trains (a loaded start model comes frozen)
        model.llm.requires_grad_(True)
    if cfg.gradient_checkpointing:
        # later transformers 5 releases renamed it and warn on every call of the old name
        getattr(model.llm, "activation_checkpointing_enable", model.llm.gradient_checkpointing_enable)()
        model.llm.enable_input_require_grads()
    return model


# How a VideoLM turns frames into visual tokens: fixed by the checkpoint a run starts from
_START_ARCHITECTURE = ("projector", "pooling", "frame_grid", "visual_positions")


def _check_start_architecture(cfg: ModelConfig, start: ModelConfig) -> None:
    """A config that asks for another visual architecture than its `init_from` checkpoint's would
    otherwise be ignored in silence; a field left at its default asks for nothing."""
    defaults = ModelConfig()
    for name in _START_ARCHITECTURE:
        wanted, built = getattr(cfg, name), getattr(start, name)
        if wanted != getattr(defaults, name) and wanted != built:
            raise ConfigError(f"model.{name}: {wanted!r} asked, but model.init_from {cfg.init_from} was built with "
                              f"{built!r}, and a start keeps its architecture; drop model.{name} or start elsewhere")


def build_video_lm(cfg: ModelConfig) -> VideoLM:
    """A trainable VideoLM from a model config: fresh, from a saved vlmalign model, or from llava-hf.

    With `init_from`, the architecture comes from that checkpoint (a projector, pooling, frame grid or
    visual positions other than its own is an error); `num_frames`, `frame_sampling`,
    `lora`, `quantization`, `train_projector` and `gradient_checkpointing` come from `cfg`. A LoRA
    adapter of the starting model is merged into its base before a new adapter is added, so that
    disabling the new adapter gives back the starting model (the reference policy).
    """
    if cfg.init_from:
        start = load_video_lm(cfg.init_from, quantization=cfg.quantization if cfg.quantization.load_in_4bit else None)
        _check_start_architecture(cfg, start.cfg)
        start_llm = start.llm.merge_and_unload() if start.uses_lora else start.llm
        arch = dataclasses.replace(
            start.cfg,
            num_frames=cfg.num_frames,
            frame_sampling=cfg.frame_sampling,
            lora=cfg.lora,
            quantization=cfg.quantization,
            train_projector=cfg.train_projector,
            gradient_checkpointing=cfg.gradient_checkpointing,
            vision=dataclasses.replace(start.cfg.vision, frozen=cfg.vision.frozen),
            init_from=None,
        )
        # a local start is recorded by its absolute path; a hub name (llava-hf) as it is
        local = Path(cfg.init_from)
        base = {"checkpoint": str(local.resolve()) if local.exists() else cfg.init_from}
        llm = _apply_lora(start_llm, arch) if cfg.lora.enabled else start_llm
        model = VideoLM(arch, start.vision, start.projector, llm, start.tokenizer, base, start.visual_positions)
        return _set_trainable(model)

    tokenizer = load_tokenizer(cfg.tokenizer, cfg.llm.pretrained)
    vision = VisionTower(cfg.vision)
    if cfg.llm.pretrained:
        llm, base = _load_llm(cfg.llm.pretrained, cfg), {"pretrained": cfg.llm.pretrained}
    else:
        if cfg.quantization.load_in_4bit:
            raise ConfigError("model.quantization.load_in_4bit needs saved base weights to quantise: model.llm.pretrained or model.init_from")
        llm, base = _random_llm(cfg, tokenizer), {}
    projector = build_projector(cfg.projector, vision.hidden_size, llm.config.hidden_size).to(_DTYPES[cfg.llm.dtype])
    if cfg.lora.enabled:
        llm = _apply_lora(llm, cfg)
    return _set_trainable(VideoLM(cfg, vision, projector, llm, tokenizer, base))


def _model_type(path: Path) -> str | None:
    """model_type of an HF checkpoint: a local folder's config.json, or a hub name (needs the hub)."""
    if path.is_dir():
        config = path / "config.json"
        return read_json(config).get("model_type") if config.is_file() else None
    if path.exists():
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path)).model_type
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model not found: {path} is no local folder and the hub could not provide it ({exc.__class__.__name__})") from None


def load_video_lm(path: str | Path, trainable: bool = False, quantization: QuantizationConfig | None = None) -> VideoLM:
    """Load a model saved by `VideoLM.save_pretrained`, or convert an HF llava-hf LLaVA-1.5 checkpoint.

    `quantization` loads the LLM base weights in 4 bits (QLoRA on top of a saved model); a saved LoRA
    adapter is then applied to the quantised base.
    """
    path = Path(path)
    if not (path / MANIFEST).is_file():
        if _model_type(path) == "llava":
            from vlmalign.model.llava import load_llava_hf

            return load_llava_hf(path if path.exists() else str(path))
        raise ConfigError(f"not a vlmalign model directory (no {MANIFEST}) nor a llava-hf checkpoint: {path}")
    manifest = read_json(path / MANIFEST)
    cfg = config_from_dict(ModelConfig, manifest["config"], source=str(path / MANIFEST))
    llm_cfg = cfg if quantization is None else dataclasses.replace(cfg, quantization=quantization)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    if manifest["vision"] == "saved":
        from transformers import CLIPVisionModel

        vision = VisionTower(cfg.vision, model=CLIPVisionModel.from_pretrained(path / "vision"))
    else:
        vision = VisionTower(cfg.vision)

    base = manifest["base"]
    if (path / "llm").is_dir():
        llm = _load_llm(path / "llm", llm_cfg)
    elif "pretrained" in base:
        llm = _load_llm(base["pretrained"], llm_cfg)
    elif "checkpoint" in base:
        try:
            start = load_video_lm(base["checkpoint"], quantization=quantization)
        except ConfigError as e:
            raise ConfigError(f"{path / MANIFEST}: base checkpoint {base['checkpoint']} cannot be loaded: {e}") from None
        llm = start.llm.merge_and_unload() if start.uses_lora else start.llm
    else:
        raise ConfigError(f"{path / MANIFEST}: no LLM weights saved and no base recorded")
    if (path / "adapter").is_dir():
        llm = load_adapter(llm, path / "adapter", trainable)

    projector = build_projector(cfg.projector, vision.hidden_size, llm.config.hidden_size)
    projector.load_state_dict(load_file(path / "projector.safetensors"))
    projector.to(_DTYPES[cfg.llm.dtype])
    positions = None
    if cfg.visual_positions:
        positions = nn.Parameter(load_file(path / "visual_positions.safetensors")["visual_positions"].to(_DTYPES[cfg.llm.dtype]))
    model = VideoLM(cfg, vision, projector, llm, tokenizer, base, positions)
    if trainable:
        return _set_trainable(model)
    model.requires_grad_(False)
    return model.eval()
