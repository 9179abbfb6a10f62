"""Video LLMs from transformers behind the policy interface (`model/policy.py`): Qwen2-VL and
Qwen2.5-VL, started from any checkpoint folder whose config.json names their class.

What the family does its own way, each in one place below:
    prompts    the checkpoint's chat template renders the conversation; a video is a content part
               ({"type": "video"}), which the template writes as <|vision_start|><|video_pad|>
               <|vision_end|>; the one <|video_pad|> becomes as many ids as the video has tokens
    frames     `num_frames` frames per video (`frame_sampling`), each resized to `frame_size`, scaled
               and normalised with the checkpoint's image mean / std, cut into the family's
               flattened patches (temporal x spatial, in merge order) with their grid (t, h, w)
    positions  Qwen's 3D rotary positions from `get_rope_index`, always with the video tokens
               marked in `mm_token_type_ids` (without them transformers silently falls back to
               1D positions); computed here for training, prefill and every decoding step
    LoRA       adapters on the language model's linear layers only; the vision tower is frozen
               unless `vision.frozen` is false, the merger trains when `train_projector` is true;
               QLoRA quantises those layers alone to 4 bits (vision tower and LM head stay full)

Saved layout (`save_pretrained`): model.json (family, config, base), tokenizer/, and hf/ (the whole
transformers model) or adapter/ (+ trainable.safetensors: trained weights outside the adapter, such
as the merger) over the recorded base (an HF checkpoint or another saved policy).

Not yet here (issue 19): Qwen3-VL, LLaVA-OneVision, LLaVA-NeXT-Video, Video-LLaVA; fps-based frame
sampling, per-video token budgets and real timestamps; a feature or pixel cache.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vlmalign.config import ModelConfig, QuantizationConfig, config_from_dict, to_dict
from vlmalign.data.formats import VIDEO_TOKEN, Turn
from vlmalign.data.template import IGNORE_INDEX, Encoded
from vlmalign.errors import ConfigError, DataError
from vlmalign.model.generation import DecodeState, cache_name
from vlmalign.model.policy import MANIFEST, Policy, hf_architecture

SUPPORTED = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
# video models transformers builds that this family does not drive yet
NOT_YET = ("Qwen3VLForConditionalGeneration", "LlavaOnevisionForConditionalGeneration",
           "LlavaNextVideoForConditionalGeneration", "VideoLlavaForConditionalGeneration")
# LLaVA-1.5 checkpoints convert to our VideoLM (`model/llava.py`); everything else with a config.json
# that is no plain causal LM is taken for an HF video model and checked here
CONVERTED_TO_VIDEO_LM = ("LlavaForConditionalGeneration",)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def is_hf_video(path: Path) -> bool:
    arch = hf_architecture(path)
    return arch is not None and arch not in CONVERTED_TO_VIDEO_LM and not arch.endswith("ForCausalLM")


def check_architecture(arch: str | None, source) -> None:
    supported = ", ".join(SUPPORTED)
    if arch in SUPPORTED:
        return
    if arch in NOT_YET:
        raise ConfigError(f"{source}: {arch} is a video model vlmalign does not train yet; supported: {supported} "
                          "(and LLaVA-1.5 checkpoints, converted to vlmalign's own model)")
    raise ConfigError(f"{source}: architecture {arch} is not a video model vlmalign knows (an image-only or unknown class); "
                      f"supported: {supported} (and LLaVA-1.5 checkpoints, converted to vlmalign's own model)")


def _model_class(arch: str):
    import transformers

    return getattr(transformers, arch)


# --- frames -> patches --------------------------------------------------------------------------
@dataclasses.dataclass
class QwenFrames:
    """A video's frames as Qwen's vision tower reads them: resized to `size` (h, w), normalised,
    cut into patches of `patch` pixels and `temporal` frames, listed merge-block by merge-block."""

    size: tuple[int, int]
    num_frames: int
    patch: int
    temporal: int
    merge: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        unit = self.patch * self.merge
        if self.size[0] % unit or self.size[1] % unit:
            raise ConfigError(f"model.frame_size: {list(self.size)} must be multiples of {unit} (patch {self.patch} x merge "
                              f"{self.merge}) for this checkpoint")

    @property
    def grid(self) -> tuple[int, int, int]:
        return -(-self.num_frames // self.temporal), self.size[0] // self.patch, self.size[1] // self.patch

    @property
    def tokens_per_video(self) -> int:
        t, h, w = self.grid
        return t * h * w // self.merge**2

    def __call__(self, frames: np.ndarray) -> dict:
        """uint8 [T, H, W, 3] -> {"pixel_values_videos": [t*h*w, 3*temporal*patch*patch], "video_grid_thw": [3]}."""
        from PIL import Image

        height, width = self.size
        resized = np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC)) for f in frames])
        x = torch.from_numpy(resized).float().div(255).permute(0, 3, 1, 2)  # [T, 3, H, W]
        x = (x - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(1, 3, 1, 1)
        if x.shape[0] != self.num_frames:
            raise DataError(f"expected {self.num_frames} frames, got {x.shape[0]}")
        if x.shape[0] % self.temporal:  # the last temporal patch repeats the last frame, as Qwen's processors do
            x = torch.cat([x, x[-1:].expand(self.temporal - x.shape[0] % self.temporal, -1, -1, -1)])
        t, h, w = self.grid
        m, p, c = self.merge, self.patch, x.shape[1]
        x = x.reshape(t, self.temporal, c, h // m, m, p, w // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, h-block, w-block, h-in-block, w-in-block | c, temporal, p, p
        return {"pixel_values_videos": x.reshape(t * h * w, c * self.temporal * p * p),
                "video_grid_thw": torch.tensor([t, h, w])}


class HFVisualInputs:
    """Per video: its patches and grid (no cache yet: frames are decoded and the tower runs in the step)."""

    use_features = False
    cache_dir = None

    def __init__(self, policy: "HFVideoLM"):
        self.policy = policy
        self.hits = self.misses = 0

    def get(self, video) -> dict:
        from vlmalign.data.features import load_frames

        cfg = self.policy.cfg
        return self.policy.frames(load_frames(video, cfg.num_frames, cfg.frame_sampling))

    def batch(self, videos: list) -> list[dict]:
        return [self.get(v) for v in videos]

    def clips(self, video, clips: int, max_clip_len: int = 20) -> list[dict]:
        """`get`'s input of `clips` clips of the video (VLM-RLAIF's narratives), each `num_frames` long."""
        from vlmalign.data.features import load_frames
        from vlmalign.video import clip_inputs

        cfg = self.policy.cfg
        return [self.policy.frames(c) for c in clip_inputs(load_frames(video, cfg.num_frames, cfg.frame_sampling), clips,
                                                           max_clip_len)]

    def precompute(self, videos: list, batch_size: int = 8, progress: bool = True) -> None:
        """Nothing to fill: this family keeps no cache yet."""


# --- the policy ---------------------------------------------------------------------------------
class HFVideoLM(Policy):
    def __init__(self, cfg: ModelConfig, hf, tokenizer, frames: QwenFrames, base: dict, architecture: str):
        super().__init__()
        self.cfg, self.hf, self.tokenizer, self.frames = cfg, hf, tokenizer, frames
        self.base, self.architecture = base, architecture
        config = self.core.config
        self.visual_slot_id = config.video_token_id
        pad_text = tokenizer.convert_ids_to_tokens(config.video_token_id)
        if pad_text is None or tokenizer.chat_template is None:
            raise ConfigError(f"{architecture}: the tokenizer does not match the model (video token id {config.video_token_id} "
                              f"is {pad_text!r}; chat template {'missing' if tokenizer.chat_template is None else 'present'})")
        # an answer holding a vision marker would read as another video: sampling never picks them
        self.unsampled_token_ids = tuple(getattr(config, key) for key in (
            "video_token_id", "image_token_id", "vision_start_token_id", "vision_end_token_id"))

    @property
    def core(self):
        """The transformers model, under the LoRA wrapper if there is one."""
        return self.hf.get_base_model() if self.uses_lora else self.hf

    @property
    def uses_lora(self) -> bool:
        return hasattr(self.hf, "peft_config")

    def adapted_module(self):
        return self.hf

    @property
    def language_model(self):
        return self.core

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def num_visual_tokens(self) -> int:
        return self.frames.tokens_per_video

    # --- prompts ------------------------------------------------------------------------------
    def _messages(self, turns) -> list[dict]:
        messages = []
        for turn in turns:
            parts = []
            if VIDEO_TOKEN in turn.text:
                parts.append({"type": "video"})
            parts.append({"type": "text", "text": turn.text.replace(VIDEO_TOKEN, "").strip()})
            messages.append({"role": turn.role, "content": parts})
        return messages

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _ids(self, text: str) -> list[int]:
        """Token ids of rendered text, each video pad token expanded to the video's token count."""
        out = []
        for i in self.tokenizer(text, add_special_tokens=False).input_ids:
            out += [i] * self.num_visual_tokens if i == self.visual_slot_id else [i]
        return out

    def encode_conversation(self, turns, max_length: int, sample_id: str = "") -> Encoded:
        """Ids and labels of a conversation: the ids of the whole conversation as the chat template
        renders it (so they equal the model's own stack's), labels on each answer up to and
        including its end-of-turn token. The answers' spans come from rendering turn by turn."""
        messages = self._messages(turns)
        full = self._render(messages, False)
        eos_text = self.tokenizer.eos_token
        spans, rendered = [], ""
        for i in range(0, len(messages) - 1, 2):
            prompt = self._render(messages[: i + 1], True)
            turn = self._render(messages[: i + 2], False)
            if not (prompt.startswith(rendered) and turn.startswith(prompt) and full.startswith(turn)):
                raise DataError(f"sample {sample_id!r}: the chat template of {self.architecture} does not render the "
                                "conversation turn by turn (a later turn changes an earlier one)")
            answer = turn[len(prompt):]
            cut = answer.find(eos_text)  # what follows the end-of-turn token (a newline) is not learnt
            if cut < 0:
                raise DataError(f"sample {sample_id!r}: the chat template of {self.architecture} ends an answer without the "
                                f"tokenizer's eos token {eos_text!r}, where sampling stops; use a checkpoint whose eos "
                                "token ends a turn (an Instruct one)")
            spans.append((len(prompt), len(prompt) + cut + len(eos_text)))
            rendered = turn
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        input_ids, labels, prompt_length = [], [], 0
        for token, (start, end) in zip(enc.input_ids, enc.offset_mapping):
            copies = self.num_visual_tokens if token == self.visual_slot_id else 1
            learnt = any(s <= start and end <= e for s, e in spans)
            input_ids += [token] * copies
            labels += [token if learnt else IGNORE_INDEX] * copies
            if spans and end <= spans[0][0]:
                prompt_length = len(input_ids)
        if prompt_length >= max_length:
            raise DataError(f"sample {sample_id!r}: the prompt needs {prompt_length} tokens ({self.num_visual_tokens} "
                            f"visual) but data.max_length is {max_length}; raise max_length or use fewer frames / a "
                            "smaller model.frame_size")
        if self.visual_slot_id in input_ids[max_length:]:  # a video of a later turn would lose its tokens
            raise DataError(f"sample {sample_id!r}: a video after token {max_length} (data.max_length) would be cut; "
                            "raise max_length or shorten the conversation")
        return Encoded(input_ids[:max_length], labels[:max_length])

    def encode_prompt(self, question: str) -> list[int]:
        return self._ids(self._render(self._messages([Turn("user", question)]), True))

    def encode_followup(self, turns, text: str, max_length: int, sample_id: str = "") -> list[int]:
        """The conversation, then a user turn with `text` and the assistant's header, as the chat
        template renders them; the conversation is cut first, so that last turn stays whole."""
        messages = self._messages(turns)
        before = self._render(messages, False)
        after = self._render(messages + self._messages([Turn("user", text)]), True)
        if not after.startswith(before):
            raise DataError(f"sample {sample_id!r}: the chat template of {self.architecture} changes the conversation "
                            "when a turn follows it")
        tail = self._ids(after[len(before):])
        return self.encode_conversation(turns, max_length - len(tail), sample_id).input_ids + tail

    # --- visual inputs and forward ----------------------------------------------------------------
    def visual_inputs(self, cache_dir) -> HFVisualInputs:
        return HFVisualInputs(self)

    def stack_visual(self, items: list[dict]) -> dict:
        return {"pixel_values_videos": torch.cat([it["pixel_values_videos"] for it in items]),
                "video_grid_thw": torch.stack([it["video_grid_thw"] for it in items])}

    def model_inputs(self, batch: dict, device) -> dict:
        keys = ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw")
        return {k: batch[k].to(device) for k in keys if k in batch}

    def _token_types(self, input_ids) -> torch.Tensor:
        return (input_ids == self.visual_slot_id).int() * 2  # text 0, image 1, video 2

    def _positions(self, input_ids, attention_mask, video_grid_thw) -> torch.Tensor:
        """Qwen's 3D rotary positions [3, B, L], the video tokens marked."""
        token_types = self._token_types(input_ids)
        # one temporal interval per video, given explicitly: transformers' default (1 s) runs out when a
        # batch holds more videos than a row has tokens (Qwen2-VL takes no intervals and ignores it)
        seconds = None if video_grid_thw is None else torch.ones(len(video_grid_thw))
        positions, _ = self.core.model.get_rope_index(input_ids, mm_token_type_ids=token_types,
                                                      video_grid_thw=video_grid_thw, attention_mask=attention_mask,
                                                      second_per_grid_ts=seconds)
        return positions

    def forward(self, input_ids, attention_mask, pixel_values_videos=None, video_grid_thw=None, position_ids=None,
                **kwargs):
        if pixel_values_videos is not None:
            pixel_values_videos = pixel_values_videos.to(self.core.model.visual.dtype)
        if position_ids is None:
            position_ids = self._positions(input_ids, attention_mask, video_grid_thw)
        return self.hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                       mm_token_type_ids=self._token_types(input_ids), **kwargs)

    def hidden_states(self, input_ids, attention_mask, pixel_values_videos=None, video_grid_thw=None) -> torch.Tensor:
        # the inner model (LoRA layers sit inside it): no LM head, no [B, L, vocab] logits
        if pixel_values_videos is not None:
            pixel_values_videos = pixel_values_videos.to(self.core.model.visual.dtype)
        return self.core.model(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=self._positions(input_ids, attention_mask, video_grid_thw),
                               pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                               mm_token_type_ids=self._token_types(input_ids)).last_hidden_state

    def prefill(self, input_ids, attention_mask, visual: dict) -> tuple[torch.Tensor, DecodeState]:
        positions = self._positions(input_ids, attention_mask, visual.get("video_grid_thw"))
        out = self.forward(input_ids, attention_mask, **visual, position_ids=positions, use_cache=True)
        # the prompt ends in text (left padding): the answer's positions continue from its last one
        return out.logits[:, -1], DecodeState(getattr(out, cache_name(self.hf)), positions[0, :, -1] + 1)

    def decode(self, tokens, attention_mask, state: DecodeState) -> torch.Tensor:
        name = cache_name(self.hf)
        rows = tokens.shape[0]
        out = self.hf(input_ids=tokens[:, None], attention_mask=attention_mask,
                      position_ids=state.position.view(1, rows, 1).expand(3, rows, 1), use_cache=True,
                      **{name: state.cache})
        state.advance(getattr(out, name))
        return out.logits[:, -1]

    # --- saving -------------------------------------------------------------------------------
    def save_pretrained(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(path / "tokenizer")
        if self.uses_lora:
            self.hf.save_pretrained(path / "adapter")
            extra = {n: p.detach().cpu().contiguous() for n, p in self.hf.named_parameters()
                     if p.requires_grad and "lora_" not in n}
            if extra:
                save_file(extra, path / "trainable.safetensors")
        else:
            self.core.save_pretrained(path / "hf")
        manifest = {"family": "hf_video", "architecture": self.architecture, "config": to_dict(self.cfg),
                    "base": self.base if self.uses_lora else {}, "image_mean": list(self.frames.mean),
                    "image_std": list(self.frames.std)}
        (path / MANIFEST).write_text(json.dumps(manifest, indent=2))


# --- building and loading -----------------------------------------------------------------------
def _frames(cfg: ModelConfig, hf_config, mean, std) -> QwenFrames:
    vision = hf_config.vision_config
    return QwenFrames(tuple(cfg.frame_size), cfg.num_frames, vision.patch_size, vision.temporal_patch_size,
                      vision.spatial_merge_size, tuple(mean), tuple(std))


def _image_stats(path: Path) -> tuple[list[float], list[float]]:
    """The checkpoint's normalisation (its preprocessor_config.json: a local folder's, or a hub name's)."""
    from transformers.utils import cached_file

    config = path / "preprocessor_config.json" if path.exists() else cached_file(
        str(path), "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    stats = json.loads(Path(config).read_text()) if config and Path(config).is_file() else {}
    return stats.get("image_mean", list(CLIP_MEAN)), stats.get("image_std", list(CLIP_STD))


def _from_checkpoint(path: Path, dtype: str, quantization: QuantizationConfig | None):
    """(transformers model, tokenizer, mean, std, architecture) of an HF checkpoint folder."""
    from transformers import AutoTokenizer

    arch = hf_architecture(path)
    check_architecture(arch, path / "config.json")
    hf = _pretrained(arch, path, dtype, quantization)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return hf, tokenizer, *_image_stats(path), arch


def _pretrained(arch: str, source, dtype: str, quantization: QuantizationConfig | None):
    """The transformers model in `dtype` ("auto": the checkpoint's own); with 4-bit quantization
    (QLoRA) only the language model's linear layers are quantised: the vision tower and the LM head
    stay in full precision."""
    kwargs = {"dtype": _DTYPES.get(dtype, dtype)}
    quantised = quantization is not None and quantization.load_in_4bit
    if quantised:
        from vlmalign.model.video_lm import four_bit_config

        kwargs["quantization_config"] = four_bit_config(quantization, skip=["lm_head", "model.visual"])
    hf = _model_class(arch).from_pretrained(source, **kwargs)
    if quantised and not torch.cuda.is_available():
        from vlmalign.model.video_lm import check_cpu_4bit_shapes

        check_cpu_4bit_shapes(hf, source)
    return hf


def _set_trainable(model: HFVideoLM) -> HFVideoLM:
    cfg, core = model.cfg, model.core
    if not model.uses_lora:  # no adapter: the whole language model trains
        core.model.language_model.requires_grad_(True)
        core.lm_head.requires_grad_(True)
    core.model.visual.requires_grad_(not cfg.vision.frozen)
    if cfg.train_projector:
        core.model.visual.merger.requires_grad_(True)
    if cfg.gradient_checkpointing:
        core.gradient_checkpointing_enable()
        core.enable_input_require_grads()
    return model


def _apply_lora(hf, cfg: ModelConfig):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from vlmalign.model.video_lm import _peft_quietly

    if cfg.quantization.load_in_4bit:
        hf = prepare_model_for_kbit_training(hf, use_gradient_checkpointing=cfg.gradient_checkpointing)
    # the vision tower has layers of the same names (its MLP's gate/up/down_proj): adapt the LLM's only
    targets = "|".join(cfg.lora.target_modules)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=rf".*language_model.*\.({targets})")
    with _peft_quietly():
        return get_peft_model(hf, lora)


def build_hf_video(cfg: ModelConfig) -> HFVideoLM:
    """A trainable policy from `model.init_from`: an HF checkpoint folder, or a saved HF video policy
    (its adapter, if any, merged into the base, so that disabling the new one gives the start)."""
    path = Path(cfg.init_from)
    quantization = cfg.quantization if cfg.quantization.load_in_4bit else None
    if (path / MANIFEST).is_file():
        start = load_hf_video(path, quantization=quantization)
        hf = start.hf.merge_and_unload() if start.uses_lora else start.hf
        tokenizer, mean, std, arch = start.tokenizer, start.frames.mean, start.frames.std, start.architecture
        base = {"checkpoint": str(path.resolve())}
    else:
        hf, tokenizer, mean, std, arch = _from_checkpoint(path, cfg.llm.dtype, quantization)
        base = {"hf": str(path.resolve()) if path.exists() else cfg.init_from}  # a hub name as it is
    hf.requires_grad_(False)
    own = dataclasses.replace(cfg, init_from=None)
    if cfg.lora.enabled:
        hf = _apply_lora(hf, cfg)
    return _set_trainable(HFVideoLM(own, hf, tokenizer, _frames(own, hf.config, mean, std), base, arch))


def load_hf_video(path, trainable: bool = False, quantization: QuantizationConfig | None = None) -> HFVideoLM:
    """A policy saved by `HFVideoLM.save_pretrained`, or an HF checkpoint folder as it is (frozen)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / MANIFEST).is_file():  # a reference or a judge as the checkpoint ships (its own dtype)
        cfg = ModelConfig()
        hf, tokenizer, mean, std, arch = _from_checkpoint(path, "auto", quantization)
        base = {"hf": str(path.resolve()) if path.exists() else str(path)}
        model = HFVideoLM(cfg, hf, tokenizer, _frames(cfg, hf.config, mean, std), base, arch)
    else:
        manifest = json.loads((path / MANIFEST).read_text())
        cfg = config_from_dict(ModelConfig, manifest["config"], source=str(path / MANIFEST))
        arch, base = manifest["architecture"], manifest["base"]
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        if (path / "hf").is_dir():
            hf = _pretrained(arch, path / "hf", cfg.llm.dtype, quantization)
        elif "hf" in base:
            hf = _pretrained(arch, base["hf"], cfg.llm.dtype, quantization)
        elif "checkpoint" in base:
            start = load_hf_video(base["checkpoint"], quantization=quantization)
            hf = start.hf.merge_and_unload() if start.uses_lora else start.hf
        else:
            raise ConfigError(f"{path / MANIFEST}: no model weights saved and no base recorded")
        if (path / "adapter").is_dir():
            from vlmalign.model.video_lm import load_adapter

            hf = load_adapter(hf, path / "adapter", trainable)
        if (path / "trainable.safetensors").is_file():
            params = dict(hf.named_parameters())
            for name, tensor in load_file(path / "trainable.safetensors").items():
                if name not in params:
                    raise ConfigError(f"{path / 'trainable.safetensors'}: weight {name} is not in the model")
                params[name].data.copy_(tensor)
        model = HFVideoLM(cfg, hf, tokenizer, _frames(cfg, hf.config, manifest["image_mean"], manifest["image_std"]),
                          base, arch)
    if trainable:
        return _set_trainable(model)
    model.requires_grad_(False)
    return model.eval()


# --- tiny random checkpoints (tests, the CPU demo) ------------------------------------------------
# A ChatML template, as Qwen's chat models use: a default system turn, then each turn between
# <|im_start|>role and <|im_end|>; a video part is written as the vision markers around one pad token.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|image_pad|>"]


def save_tiny_hf_video(out, words: list[str], architecture: str = "Qwen2_5_VLForConditionalGeneration",
                       hidden: int = 64, layers: int = 2, seed: int = 0, intermediate: int | None = None,
                       kv_heads: int = 2) -> Path:
    """A random tiny checkpoint of `architecture` in `out` (config.json, weights, a word-level tokenizer
    over `words` with the family's special tokens and a ChatML template, preprocessor_config.json),
    loadable by `from_pretrained` like a hub checkpoint. Built offline."""
    from vlmalign.model.tokenizer import build_word_tokenizer

    check_architecture(architecture, "save_tiny_hf_video")
    out = Path(out)
    tokenizer = build_word_tokenizer(sorted(set(words) | set("system you are a helpful assistant . user".split())))
    tokenizer.add_special_tokens({"additional_special_tokens": CHATML_SPECIAL, "eos_token": "<|im_end|>"})
    tokenizer.chat_template = CHATML_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in CHATML_SPECIAL}
    half = hidden // 4 // 2  # rotary frequencies per head (4 heads); Qwen splits them 1 : 1.5 : 1.5 over t, h, w
    sections = [half // 4, (half - half // 4) // 2, (half - half // 4) // 2]
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                rope_scaling={"type": "mrope", "mrope_section": sections},
                pad_token_id=tokenizer.pad_token_id, eos_token_id=ids["<|im_end|>"], bos_token_id=None)
    if architecture == "Qwen2_5_VLForConditionalGeneration":
        from transformers import Qwen2_5_VLConfig as Config

        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1], window_size=56)
    else:
        from transformers import Qwen2VLConfig as Config

        vision = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
    config = Config(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                    video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                    vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = _model_class(architecture)(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps({"image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
                                                             "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}))
    return out
