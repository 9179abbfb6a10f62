"""Video LLMs from transformers behind the policy interface (`model/policy.py`): Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, LLaVA-OneVision, LLaVA-NeXT-Video and Video-LLaVA, started from any checkpoint folder whose
config.json names their class.

What the family does its own way, each in one place below:
    layout     which frames of a video are read and when (`VideoLayout`, from the video's frame count
               and rate, never its pixels): `num_frames` of them (`frame_sampling`), or `fps` per
               second within [min_frames, max_frames]; a frame folder's rate is `frame_folder_fps`
    prompts    the checkpoint's chat template renders the conversation; a video is a content part
               ({"type": "video"}), which the template writes as <|vision_start|><|video_pad|>
               <|vision_end|>; the pad is then expanded as transformers' processor expands it:
               Qwen2(.5)-VL: one pad per video token; Qwen3-VL: per temporal patch its time
               ("<1.6 seconds>", the mean of its two frames' times) and its own markers around one
               pad per token of that patch, in place of the template's markers (as qwen-vl-utils and
               transformers >= 5.25 write it; 5.0-5.24 kept them around the patches); LLaVA-OneVision's template
               writes "<|im_start|>role " and the video's <video>, which becomes frames x
               ceil(side / patch / 2)^2 tokens (196 a frame at 384 pixels) and one newline token;
               LLaVA-NeXT-Video's and Video-LLaVA's Vicuna template writes "USER: <video>\n..."; their
               <video> becomes frames x (side / patch / 2)^2 pooled tokens (144 a frame at 336
               pixels), and frames x ((side / patch)^2 + 1) (257 a frame at 224 pixels, the class
               token kept); the ids get the tokenizer's special tokens as the processor's do (the
               BOS of their LLaMA tokenizers)
    frames     each read frame resized to `frame_size`, scaled and normalised with the checkpoint's
               image mean / std; Qwen: cut into the family's flattened patches (temporal x spatial,
               in merge order) with their grid (t, h, w); the LLaVA families: whole frames at their
               tower's size (LLaVA-NeXT-Video and Video-LLaVA: short side resized, centre cut, as
               CLIP's processor does), each video through the tower alone (lengths may differ)
    pixels     Qwen only (the LLaVA towers' position embeddings are learnt for one size): with
               `max_video_pixels`, a video whose frames would hold more pixels than that, all frames
               read together, reads every frame at one smaller size: frame_size scaled by the one
               factor that fits, each side rounded down to whole merged patches, never below one (a
               video over the budget even then is an error). The size follows from the frame count
               alone, so nothing records it: grid, token count, ids and patches all derive it from the
               layout's frame count (`QwenFrames.frame_size`), and the pixel cache's key holds the
               budget. Videos of one batch may differ in size: their patches are concatenated
    positions  Qwen's 3D rotary positions from `get_rope_index`, always with the video tokens
               marked in `mm_token_type_ids` (without them transformers silently falls back to 1D
               positions), computed here for training, prefill and every decoding step; Qwen2.5-VL
               steps a video's time by its real seconds per temporal patch (second_per_grid_ts);
               the LLaVA families: 1D positions
    time       Qwen2.5-VL and Qwen3-VL need each video's frame rate: without one transformers assumes
               24 fps and misplaces the frames; here a video without a rate is an error
    answers    labels cover each answer's text and its end-of-turn token, found in the text its turn
               adds (LLaVA-OneVision's template heads an answer "assistant \n", its generation prompt
               "assistant\n": training and prompting differ by that space, as the checkpoint ships;
               the Vicuna template ends an answer with a space, no eos: training adds the eos after it)
    LoRA       adapters on the language model's linear layers only; the vision tower is frozen
               unless `vision.frozen` is false, its projectors (Qwen's merger and Qwen3-VL's deepstack
               mergers; LLaVA-OneVision's projector and newline embedding; the others' projector) train
               when `train_projector` is true; QLoRA quantises the language model's layers alone to 4
               bits (vision towers, projectors and LM head stay full)
    features   with the whole visual path frozen (the tower and its projectors, the recipes' setting)
               a video's visual features are computed once, by the tower and projectors alone
               (transformers' `get_video_features`), and handed to every forward pass precomputed
               (`mm_encoder_outputs`), so no training step runs the tower; with a trainable
               projector or tower each step runs them on the pixels
    cache      with a cache folder (`data.feature_cache`) each video's layout and its features (frozen
               visual path) or tower input (the frames' pixels or patches, Qwen's grid) are stored
               once (`HFVisualInputs`), keyed by the video file and everything that decides them, the
               visual path's weights too for features

Saved layout (`save_pretrained`): model.json (family, config, base), tokenizer/, and hf/ (the whole
transformers model) or adapter/ (+ trainable.safetensors: trained weights outside the adapter, such
as the merger) over the recorded base (an HF checkpoint or another saved policy).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from operator import attrgetter
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vlmalign.config import ModelConfig, QuantizationConfig, config_from_dict, to_dict
from vlmalign.data.features import VideoCache, frame_count_and_rate, load_frames_at
from vlmalign.data.formats import VIDEO_TOKEN, Turn, read_json
from vlmalign.data.template import IGNORE_INDEX, Encoded
from vlmalign.errors import ConfigError, DataError
from vlmalign.model.generation import DecodeState, cache_name, left_positions
from vlmalign.model.policy import MANIFEST, Policy, hf_architecture
from vlmalign.video import sample_indices

SUPPORTED = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration",
             "LlavaOnevisionForConditionalGeneration", "LlavaNextVideoForConditionalGeneration",
             "VideoLlavaForConditionalGeneration")
# LLaVA-1.5 checkpoints convert to our VideoLM (`model/llava.py`); everything else with a config.json
# that is no plain causal LM is taken for an HF video model and checked here
CONVERTED_TO_VIDEO_LM = ("LlavaForConditionalGeneration",)
# bump when `QwenFrames` or `TowerFrames` compute other pixels, so that older pixel cache entries miss
PIXEL_CACHE_VERSION = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def is_hf_video(path: Path) -> bool:
    arch = hf_architecture(path)
    return arch is not None and arch not in CONVERTED_TO_VIDEO_LM and not arch.endswith("ForCausalLM")


def check_architecture(arch: str | None, source) -> None:
    supported = ", ".join(SUPPORTED)
    if arch in SUPPORTED:
        return
    raise ConfigError(f"{source}: architecture {arch} is not a video model vlmalign knows (an image-only or unknown class); "
                      f"supported: {supported} (and LLaVA-1.5 checkpoints, converted to vlmalign's own model)")


def _model_class(arch: str):
    import transformers

    return getattr(transformers, arch)


# --- which frames, and when ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VideoLayout:
    """Which frames of a video the model reads and when: the sampled frames' positions among the
    video's `total` decoded frames, and its frame rate (None where a frame folder has none). A
    family's ids and positions depend on it; it is read from the video's metadata, not its pixels."""

    indices: tuple[int, ...]
    total: float  # decoded frames the reading spans (a clip: its share of the video's, see `clip`)
    fps: float | None

    def times(self, temporal: int) -> list[float]:
        """Seconds of each temporal patch: the mean time of its first and last frame (Qwen3-VL's
        timestamps; the last patch repeats the last frame when the count is odd)."""
        indices = list(self.indices) + [self.indices[-1]] * (-len(self.indices) % temporal)
        return [(indices[i] + indices[i + temporal - 1]) / 2 / self.fps for i in range(0, len(indices), temporal)]

    def seconds_per_patch(self, temporal: int) -> float:
        """Seconds one temporal patch spans at the sampled rate (Qwen2.5-VL's second_per_grid_ts)."""
        return temporal / (len(self.indices) / self.total * self.fps)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "VideoLayout":
        fields = json.loads(text)
        return cls(tuple(fields["indices"]), fields["total"], fields["fps"])

    def clip(self, indices) -> "VideoLayout":
        """The layout of a clip read at `indices` (its frames stretched to the video's count): it spans
        its share of the video's frames, so a patch of it spans its own, shorter time."""
        indices = tuple(int(i) for i in indices)
        share = max(indices[-1] - indices[0], 1) / max(self.indices[-1] - self.indices[0], 1)
        return dataclasses.replace(self, indices=indices, total=self.total * share)


def video_name(video) -> str:
    """A video file or frame folder as it is; a list of frame images by its first frame and count."""
    return video if isinstance(video, str) else f"{video[0]} (+{len(video) - 1} frames)"


def check_frame_settings(cfg: ModelConfig) -> None:
    if cfg.fps is not None and cfg.fps <= 0:
        raise ConfigError(f"model.fps: {cfg.fps} must be positive (frames per second), or null to read model.num_frames")
    if not 1 <= cfg.min_frames <= cfg.max_frames:
        raise ConfigError(f"model.min_frames {cfg.min_frames} and model.max_frames {cfg.max_frames}: need 1 <= min <= max")
    if cfg.frame_folder_fps is not None and cfg.frame_folder_fps <= 0:
        raise ConfigError(f"model.frame_folder_fps: {cfg.frame_folder_fps} must be positive")
    if cfg.max_visual_tokens is not None and cfg.max_visual_tokens < 1:
        raise ConfigError(f"model.max_visual_tokens: {cfg.max_visual_tokens} must be at least 1, or null for no budget")
    if cfg.max_video_pixels is not None and cfg.max_video_pixels < 1:
        raise ConfigError(f"model.max_video_pixels: {cfg.max_video_pixels} must be at least 1, or null for no budget")


def frame_indices(total: int, fps: float | None, cfg: ModelConfig, video, whole_patches: int | None = None) -> tuple[int, ...]:
    """Positions of the frames to read out of `total`: `num_frames` of them (`frame_sampling`), or,
    with `model.fps`, that many per second of video within [min_frames, max_frames], evenly spaced
    as the family's transformers video processor samples them. `whole_patches` (Qwen2-VL and
    Qwen2.5-VL): their processor rounds the count down to whole temporal patches and steps through
    the video from its first frame; Qwen3-VL's spreads the count from the first frame to the last."""
    if cfg.fps is None:
        return tuple(sample_indices(total, cfg.num_frames, cfg.frame_sampling))
    if fps is None:
        raise DataError(f"video {video_name(video)}: no frame rate to sample model.fps={cfg.fps} from (a frame folder or list); set "
                        "model.frame_folder_fps to the rate its frames were taken at, or sample model.num_frames")
    if whole_patches:
        most = min(cfg.max_frames, total) // whole_patches * whole_patches
        count = int(min(max(total / fps * cfg.fps, cfg.min_frames), most, total) // whole_patches * whole_patches)
        if count < 1:
            raise DataError(f"video {video_name(video)}: {total} frames hold no whole temporal patch of {whole_patches} frames")
        return tuple(torch.arange(0, total, total / count).int().tolist())
    count = min(max(int(total / fps * cfg.fps), cfg.min_frames), cfg.max_frames, total)
    return tuple(np.linspace(0, total - 1, count).round().astype(int).tolist())


# --- frames -> patches --------------------------------------------------------------------------
@dataclasses.dataclass
class QwenFrames:
    """A video's frames as Qwen's vision tower reads them: resized to `size` (h, w), or smaller where
    `max_video_pixels` bounds the video's pixels (`frame_size`), normalised, cut into patches of
    `patch` pixels and `temporal` frames, listed merge-block by merge-block."""

    size: tuple[int, int]
    patch: int
    temporal: int
    merge: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_video_pixels: int | None = None

    @property
    def unit(self) -> int:
        """A frame side's step: one merged patch, in pixels."""
        return self.patch * self.merge

    def __post_init__(self):
        if self.size[0] % self.unit or self.size[1] % self.unit:
            raise ConfigError(f"model.frame_size: {list(self.size)} must be multiples of {self.unit} (patch {self.patch} x "
                              f"merge {self.merge}) for this checkpoint")

    def frame_size(self, num_frames: int) -> tuple[int, int]:
        """(h, w) of each frame of a video of `num_frames` frames: `size`, or, when the video would
        hold more than `max_video_pixels`, `size` scaled by the one factor that makes it fit, each
        side rounded down to whole merged patches but never below one (a video that still does not
        fit is refused where its layout is read). Integer arithmetic: floor(sqrt(floor(x))) is
        floor(sqrt(x)), so a budget met exactly is never missed by a rounding error."""
        height, width = self.size
        budget = self.max_video_pixels
        if budget is None or num_frames * height * width <= budget:
            return self.size
        return tuple(max(self.unit, math.isqrt(side * side * budget // (num_frames * height * width)) // self.unit * self.unit)
                     for side in self.size)

    def grid(self, num_frames: int) -> tuple[int, int, int]:
        height, width = self.frame_size(num_frames)
        return -(-num_frames // self.temporal), height // self.patch, width // self.patch

    def tokens(self, num_frames: int) -> int:
        """Visual tokens of a video of `num_frames` frames."""
        t, h, w = self.grid(num_frames)
        return t * h * w // self.merge**2

    def __call__(self, frames: np.ndarray) -> dict:
        """uint8 [T, H, W, 3] -> {"pixel_values_videos": [t*h*w, 3*temporal*patch*patch], "video_grid_thw": [3]}."""
        from PIL import Image

        height, width = self.frame_size(len(frames))
        resized = np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC)) for f in frames])
        x = torch.from_numpy(resized).float().div(255).permute(0, 3, 1, 2)  # [T, 3, H, W]
        x = (x - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(1, 3, 1, 1)
        t, h, w = self.grid(x.shape[0])
        if x.shape[0] % self.temporal:  # the last temporal patch repeats the last frame, as Qwen's processors do
            x = torch.cat([x, x[-1:].expand(self.temporal - x.shape[0] % self.temporal, -1, -1, -1)])
        m, p, c = self.merge, self.patch, x.shape[1]
        x = x.reshape(t, self.temporal, c, h // m, m, p, w // m, m, p)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, h-block, w-block, h-in-block, w-in-block | c, temporal, p, p
        return {"pixel_values_videos": x.reshape(t * h * w, c * self.temporal * p * p),
                "video_grid_thw": torch.tensor([t, h, w])}


@dataclasses.dataclass
class TowerFrames:
    """A video's frames as a LLaVA tower reads them: whole frames of `side` x `side` pixels, scaled and
    normalised, each through the tower alone. LLaVA-OneVision's video processor resizes a frame to
    that square; LLaVA-NeXT-Video's and Video-LLaVA's (CLIP's steps) resize its short side to `side`
    and cut the centre square (`crop`). A video is `per_frame` tokens a frame and `extra` after
    them (LLaVA-OneVision's newline)."""

    side: int
    patch: int
    per_frame: int
    extra: int
    crop: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def tokens(self, num_frames: int) -> int:
        return num_frames * self.per_frame + self.extra

    def frame_size(self, num_frames: int) -> tuple[int, int]:
        return self.side, self.side

    def _square(self, frame: np.ndarray) -> np.ndarray:
        from PIL import Image

        image = Image.fromarray(frame)
        if not self.crop:
            return np.asarray(image.resize((self.side, self.side), Image.BICUBIC))
        height, width = frame.shape[:2]  # the short side to `side`, the long one in proportion (rounded down)
        size = (self.side, int(self.side * height / width)) if width <= height else (int(self.side * width / height), self.side)
        resized = np.asarray(image.resize(size, Image.BICUBIC))
        top, left = (resized.shape[0] - self.side) // 2, (resized.shape[1] - self.side) // 2
        return resized[top: top + self.side, left: left + self.side]

    def __call__(self, frames: np.ndarray) -> dict:
        """uint8 [T, H, W, 3] -> {"pixel_values_videos": [T, 3, side, side]}."""
        x = torch.from_numpy(np.stack([self._square(f) for f in frames])).float().div(255).permute(0, 3, 1, 2)
        return {"pixel_values_videos": (x - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(1, 3, 1, 1)}


class HFVisualInputs:
    """Per video: its layout, and what a forward pass reads of it: the visual features (the output of
    the tower and its projectors, `policy.video_features`) when the whole visual path is frozen
    (`use_features`), else the tower's input (the tensors `policy.frames` makes). With a cache folder
    (`data.feature_cache`) both are stored once per video (`data.features.VideoCache`) under
    <folder>/<architecture>-<features|pixels>-<hash of the frame settings, the processor and, for
    features, the visual path's weights>/, so later epochs, stages and runs read them back, bit for
    bit, instead of decoding the frames and running the tower again. Clips (`clips`, VLM-RLAIF's
    narratives) are computed each time: Qwen pairs frames into temporal patches, so a clip's patches
    are not a slice of the video's."""

    def __init__(self, policy: "HFVideoLM", cache_dir: str | None = None):
        self.policy = policy
        self.use_features = policy.visual_path_frozen
        self.hits = self.misses = 0
        self.cache = self.cache_dir = None
        if cache_dir:
            # what decides the entries besides the video; PIXEL_CACHE_VERSION: how `frames` computes pixels
            settings = {**policy.frame_settings(), "frames": dataclasses.asdict(policy.frames), "version": PIXEL_CACHE_VERSION}
            if self.use_features:
                settings["weights"] = policy.visual_fingerprint()
            digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
            kind = "features" if self.use_features else "pixels"
            self.cache = VideoCache(Path(cache_dir) / f"{policy.architecture}-{kind}-{digest}")
            self.cache_dir = self.cache.folder

    def _inputs(self, frames: np.ndarray) -> dict:
        pixels = self.policy.frames(frames)
        return self.policy.video_features(pixels) if self.use_features else pixels

    def _read(self, video) -> tuple[np.ndarray, VideoLayout]:
        layout = self.policy.video_layout(video)
        return load_frames_at(video, list(layout.indices)), layout

    def get(self, video) -> dict:
        path = self.cache.path(video) if self.cache else None
        entry = self.cache.read(path) if path else None
        if entry is not None:
            self.hits += 1
            tensors, metadata = entry
            return {**tensors, "layout": VideoLayout.from_json(metadata["layout"])}
        self.misses += 1
        frames, layout = self._read(video)
        inputs = self._inputs(frames)
        if path:
            self.cache.write(path, inputs, {"layout": layout.to_json()})
        return {**inputs, "layout": layout}

    def batch(self, videos: list) -> list[dict]:
        return [self.get(v) for v in videos]

    def clips(self, video, clips: int, max_clip_len: int = 20) -> list[dict]:
        """`get`'s input of `clips` clips of the video (VLM-RLAIF's narratives), each stretched back
        to the video's frame count, with the times of the frames it repeats."""
        from vlmalign.video import clip_inputs

        frames, layout = self._read(video)
        positions = clip_inputs(np.asarray(layout.indices), clips, max_clip_len)
        return [{**self._inputs(f), "layout": layout.clip(i.tolist())}
                for f, i in zip(clip_inputs(frames, clips, max_clip_len), positions)]

    def precompute(self, videos: list, batch_size: int = 8, progress: bool = True) -> None:
        """Read each distinct video's layout (so a video without a frame rate fails before training)
        and print how many frames and visual tokens the videos get; then, with a cache folder, store
        the entries of those not in it yet (one video at a time: `batch_size` serves VideoLM's)."""
        from tqdm.auto import tqdm

        distinct = list({v if isinstance(v, str) else tuple(v): v for v in videos}.values())
        layouts = [self.policy.video_layout(v) for v in distinct]
        if layouts:
            print(self.policy.describe_layouts(layouts), flush=True)
        missing = [v for v in distinct if self.cache and not self.cache.path(v).is_file()]
        desc = "video features" if self.use_features else "video pixels"
        for video in tqdm(missing, desc=desc, disable=not progress or not missing, unit="video"):
            self.get(video)


# --- the policy ---------------------------------------------------------------------------------
class HFVideoLM(Policy):
    """Qwen2-VL, and the base of the other families below (Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision),
    which change how a video shows in the prompt, the vision tower's input and the positions."""

    # the vision tower, and what maps its features into the language model ("the projector"), under
    # the transformers model's `model`; QLoRA keeps these (and the LM head) in full precision
    vision_module = "visual"
    projector_modules = ("visual.merger",)
    # the config's ids of the vision markers (sampling never picks them)
    marker_keys = ("video_token_id", "image_token_id", "vision_start_token_id", "vision_end_token_id")
    # vision towers a video never runs through (kept in full precision under QLoRA, never trained)
    other_towers = ()
    # whether the family places frames by time (then a video without a frame rate is an error)
    needs_frame_rate = False
    # model.fps sampling as the family's processor does it (`frame_indices`): Qwen2-VL and Qwen2.5-VL
    # read whole temporal patches
    samples_whole_patches = True
    # whether get_rope_index takes each video's seconds per temporal patch (Qwen2.5-VL)
    positions_take_seconds = False
    # whether the chat template ends an answer without the eos the model stops at (a Vicuna template
    # of the llava-hf checkpoints): then training puts the eos right after each answer's text
    adds_eos_after_answers = False

    def __init__(self, cfg: ModelConfig, hf, tokenizer, frames: QwenFrames, base: dict, architecture: str):
        super().__init__()
        self.cfg, self.hf, self.tokenizer, self.frames = cfg, hf, tokenizer, frames
        self.base, self.architecture = base, architecture
        check_frame_settings(cfg)
        config = self.core.config
        self.visual_slot_id = config.video_token_id
        self.video_pad = tokenizer.convert_ids_to_tokens(config.video_token_id)
        if self.video_pad is None or tokenizer.chat_template is None:
            raise ConfigError(f"{architecture}: the tokenizer does not match the model (video token id {config.video_token_id} "
                              f"is {self.video_pad!r}; chat template {'missing' if tokenizer.chat_template is None else 'present'})")
        # an answer holding a vision marker would read as another video: sampling never picks them
        self.unsampled_token_ids = tuple(getattr(config, key) for key in self.marker_keys)
        self._layouts: dict = {}

    @property
    def core(self):
        """The transformers model, under the LoRA wrapper if there is one."""
        return self.hf.get_base_model() if self.uses_lora else self.hf

    @property
    def vision_tower(self):
        return getattr(self.core.model, self.vision_module)

    def _visual_path(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer a video's features depend on: the tower's and its projectors'
        (LLaVA-OneVision's newline embedding is a bare parameter)."""
        tensors = {}
        for name in (self.vision_module, *self.projector_modules):
            part = attrgetter(name)(self.core.model)
            items = {"": part} if isinstance(part, torch.Tensor) else part.state_dict(keep_vars=True)
            tensors.update({f"{name}.{k}".rstrip("."): v for k, v in items.items()})
        return tensors

    @property
    def visual_path_frozen(self) -> bool:
        """Whether nothing between the pixels and the language model trains: then a video's features
        are fixed and can be computed once (`HFVisualInputs`)."""
        return not any(t.requires_grad for t in self._visual_path().values())

    def visual_fingerprint(self) -> str:
        """A hash of the visual path's weights: cached features die with any change of them (another
        checkpoint, a trained projector)."""
        h = hashlib.sha256()
        for name, tensor in sorted(self._visual_path().items()):
            h.update(name.encode())
            h.update(tensor.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    @torch.no_grad()
    def video_features(self, pixels: dict) -> dict:
        """One video's features as the language model reads them, from its tower input (`frames`):
        Qwen: the merged patches [tokens, hidden] and the grid; Qwen3-VL also its deepstack features
        [layers, tokens, hidden]."""
        out = self.core.model.get_video_features(pixels["pixel_values_videos"].to(self.device, self.vision_tower.dtype),
                                                 pixels["video_grid_thw"][None].to(self.device))
        features = {"video_features": out.pooler_output[0].cpu(), "video_grid_thw": pixels["video_grid_thw"]}
        if getattr(out, "deepstack_features", None):
            features["deepstack_features"] = torch.stack([layer[0] for layer in out.deepstack_features]).cpu()
        return features

    @classmethod
    def checkpoint_config(cls, hf_config) -> ModelConfig:
        """The settings of a checkpoint loaded as it ships (a reference, a judge): the defaults, with
        the frame size moved to the nearest multiple of the family's merged patch (Qwen3-VL's 32
        pixels do not divide the default 336)."""
        vision = hf_config.vision_config
        unit = vision.patch_size * vision.spatial_merge_size
        side = max(unit, round(ModelConfig().frame_size[0] / unit) * unit)
        return ModelConfig(frame_size=[side, side])

    @classmethod
    def make_frames(cls, cfg: ModelConfig, hf_config, mean, std) -> QwenFrames:
        """How this family turns frames into the vision tower's input."""
        vision = hf_config.vision_config
        return QwenFrames(tuple(cfg.frame_size), vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size,
                          tuple(mean), tuple(std), cfg.max_video_pixels)

    @property
    def uses_lora(self) -> bool:
        return hasattr(self.hf, "peft_config")

    def adapted_module(self):
        return self.hf

    @property
    def language_model(self):
        return self.core

    def frame_settings(self) -> dict:
        keys = ("num_frames", "frame_sampling", "fps", "min_frames", "max_frames", "frame_size", "frame_folder_fps",
                "max_visual_tokens", "max_video_pixels")
        return {"model": self.architecture, **{key: getattr(self.cfg, key) for key in keys}}

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens of a video of the most frames the frame settings read."""
        return self.frames.tokens(self.cfg.num_frames if self.cfg.fps is None else self.cfg.max_frames)

    # --- videos -------------------------------------------------------------------------------------
    def video_layout(self, video) -> VideoLayout | None:
        """Which frames of `video` (a file, frame folder or list of frame images) the model reads,
        and when; from its metadata, once per video."""
        if video is None:
            return None
        key = video if isinstance(video, str) else tuple(video)
        if key not in self._layouts:
            total, fps = frame_count_and_rate(video)
            fps = fps or self.cfg.frame_folder_fps
            if fps is None and self.needs_frame_rate:  # transformers would assume 24 fps and misplace the frames
                raise DataError(f"video {video_name(video)}: {self.architecture} places frames by their time, and this video has no "
                                "frame rate (a frame folder or list); set model.frame_folder_fps to the rate its frames "
                                "were taken at")
            whole = self.frames.temporal if self.samples_whole_patches else None
            indices = frame_indices(total, fps, self.cfg, video, whole)
            pixels = self.cfg.max_video_pixels
            if pixels is not None and len(indices) * math.prod(self.frames.frame_size(len(indices))) > pixels:
                unit = self.frames.unit
                raise DataError(f"video {video_name(video)}: {len(indices)} frames of even {unit} x {unit} pixels (one merged "
                                f"patch) are {len(indices) * unit * unit} pixels, over model.max_video_pixels {pixels}; read "
                                "fewer frames (model.num_frames, model.max_frames) or raise the budget")
            budget = self.cfg.max_visual_tokens
            if budget is not None and self.frames.tokens(len(indices)) > budget:
                # the budget caps the frames read (their size is model.frame_size's, or max_video_pixels'
                # for that count). Counts the family reads whole (Qwen2(.5)-VL: whole temporal patches)
                # are the only candidates: under a pixel budget fewer frames may be larger ones, and
                # more tokens, so the count read must be the count checked
                fits = max((n for n in range(1, len(indices)) if not (whole and n % whole) and self.frames.tokens(n) <= budget),
                           default=0)
                if self.cfg.fps is None or fits < self.cfg.min_frames:
                    raise DataError(f"video {video_name(video)}: {len(indices)} frames give {self.frames.tokens(len(indices))} "
                                    f"visual tokens, over model.max_visual_tokens {budget} (at most {fits} frames fit); "
                                    "read fewer frames (model.num_frames, model.min_frames) or a smaller model.frame_size")
                indices = frame_indices(total, fps, dataclasses.replace(self.cfg, max_frames=fits), video, whole)
            self._layouts[key] = VideoLayout(indices, total, fps)
        return self._layouts[key]

    def inputs_layout(self, inputs: dict) -> VideoLayout:
        return inputs["layout"]

    def visual_tokens(self, layout: VideoLayout) -> int:
        return self.frames.tokens(len(layout.indices))

    def describe_layouts(self, layouts: list[VideoLayout]) -> str:
        """One line: the frames and visual tokens per video over `layouts` (a range when they differ)."""
        def span(values):
            return f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)} (median {int(np.median(values))})"

        frames = [len(layout.indices) for layout in layouts]
        sampling = f"{self.cfg.num_frames} by {self.cfg.frame_sampling}" if self.cfg.fps is None else \
            f"{self.cfg.fps} per second within [{self.cfg.min_frames}, {self.cfg.max_frames}]"
        sizes = sorted({self.frames.frame_size(n) for n in frames}, key=math.prod)
        size = " to ".join(f"{h} x {w}" for h, w in dict.fromkeys([sizes[0], sizes[-1]]))
        budget = f" (model.max_video_pixels {self.cfg.max_video_pixels})" if self.cfg.max_video_pixels is not None else ""
        return (f"{self.architecture}: {len(layouts)} videos, frames read {span(frames)} ({sampling}), visual tokens per "
                f"video {span([self.visual_tokens(layout) for layout in layouts])} at {size} pixels{budget}")

    def _template_video(self, text: str) -> str:
        """What of the chat template's text stands for a video and is replaced by `_video_text`: its pad."""
        return self.video_pad

    def _video_text(self, layout: VideoLayout) -> str:
        """What the chat template's video pad becomes in the text: one pad for the whole video."""
        return self.video_pad

    def _pad_copies(self, layout: VideoLayout) -> int:
        """Ids each video pad of `_video_text` stands for."""
        return self.visual_tokens(layout)

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

    def _render(self, messages: list[dict], generation_prompt: bool, layout: VideoLayout | None) -> str:
        """The chat template's text, its video (`_template_video`) replaced by the family's text for the
        video, as transformers' processor replaces it."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        if self.video_pad not in text:
            return text
        if layout is None:
            raise ValueError(f"{self.architecture}: a prompt with a video needs the video's layout (policy.video_layout)")
        return text.replace(self._template_video(text), self._video_text(layout))

    def encode_conversation(self, turns, max_length: int, sample_id: str = "", layout: VideoLayout | None = None) -> Encoded:
        """Ids and labels of a conversation: the ids of the whole conversation as the chat template
        and the processor render it (so they equal the model's own stack's), labels on each answer's
        text up to and including its end-of-turn token. Each answer is found in the text its turn
        adds (a template may write a role header before it that differs from its generation prompt,
        as LLaVA-OneVision's does: "assistant \n" there, "assistant\n" when prompting)."""
        messages = self._messages(turns)
        full = self._render(messages, False, layout)
        eos_text = self.tokenizer.eos_token
        spans, answer_ends, rendered = [], set(), ""
        for i in range(0, len(messages) - 1, 2):
            before = self._render(messages[: i + 1], False, layout)
            turn = self._render(messages[: i + 2], False, layout)
            answer_text = turns[i + 1].text.strip()
            if not answer_text:
                raise DataError(f"sample {sample_id!r}: answer {i // 2 + 1} is empty")
            if not (before.startswith(rendered) and turn.startswith(before) and full.startswith(turn)):
                raise DataError(f"sample {sample_id!r}: the chat template of {self.architecture} does not render the "
                                "conversation turn by turn (a later turn changes an earlier one)")
            # the turn's own end-of-turn token is its last one; the answer sits right before it (searching
            # for the answer instead would find "end" or "m" inside the "<|im_end|>" marker)
            cut = turn.rfind(eos_text, len(before))  # what follows the end-of-turn token is not learnt
            if cut < 0 and not self.adds_eos_after_answers:
                raise DataError(f"sample {sample_id!r}: the chat template of {self.architecture} ends an answer without the "
                                f"tokenizer's eos token {eos_text!r}, where sampling stops; use a checkpoint whose eos "
                                "token ends a turn (an Instruct one)")
            written = turn[len(before):cut if cut >= 0 else len(turn)].rstrip()
            if not written.endswith(answer_text):
                raise DataError(f"sample {sample_id!r}: the chat template of {self.architecture} does not write answer "
                                f"{i // 2 + 1} as given, right before its end-of-turn token")
            start = len(before) + len(written) - len(answer_text)
            if cut >= 0:
                spans.append((start, cut + len(eos_text)))
            else:  # the eos the template leaves out is learnt right after the answer
                spans.append((start, start + len(answer_text)))
                answer_ends.add(start + len(answer_text))
            rendered = turn
        enc = self._tokenize(full, return_offsets_mapping=True)
        copies = self._pad_copies(layout) if layout is not None else 1
        input_ids, labels, prompt_length = [], [], 0
        for token, (start, end) in zip(enc.input_ids, enc.offset_mapping):
            n = copies if token == self.visual_slot_id else 1
            learnt = any(s <= start and end <= e for s, e in spans)
            input_ids += [token] * n
            labels += [token if learnt else IGNORE_INDEX] * n
            if end in answer_ends:  # the eos the template leaves out: learnt, right after the answer
                input_ids.append(self.tokenizer.eos_token_id)
                labels.append(self.tokenizer.eos_token_id)
            if spans and end <= spans[0][0]:
                prompt_length = len(input_ids)
        if prompt_length >= max_length:
            visual = self.visual_tokens(layout) if layout is not None else 0
            raise DataError(f"sample {sample_id!r}: the prompt needs {prompt_length} tokens ({visual} visual) but "
                            f"data.max_length is {max_length}; raise max_length or read fewer frames (model.num_frames, "
                            "model.max_frames) or a smaller model.frame_size")
        if self.visual_slot_id in input_ids[max_length:]:  # a video of a later turn would lose its tokens
            raise DataError(f"sample {sample_id!r}: a video after token {max_length} (data.max_length) would be cut; "
                            "raise max_length or shorten the conversation")
        return Encoded(input_ids[:max_length], labels[:max_length])

    def _tokenize(self, text: str, **kwargs):
        """A whole rendered chat tokenized as transformers' processor tokenizes it: with the tokenizer's
        own special tokens (a LLaMA tokenizer's BOS, which the Vicuna templates do not write) unless
        the text already starts with its BOS."""
        bos = self.tokenizer.bos_token
        return self.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)), **kwargs)

    def _ids(self, text: str, layout: VideoLayout | None, whole: bool) -> list[int]:
        """Token ids of rendered text (`whole`: a chat from its start, else a piece that follows one),
        each video pad expanded to the ids it stands for."""
        copies = self._pad_copies(layout) if layout is not None else 1
        ids = self._tokenize(text) if whole else self.tokenizer(text, add_special_tokens=False)
        return [i for t in ids.input_ids for i in ([t] * copies if t == self.visual_slot_id else [t])]

    def encode_prompt(self, question: str, layout: VideoLayout | None = None) -> list[int]:
        return self._ids(self._render(self._messages([Turn("user", question)]), True, layout), layout, whole=True)

    def encode_followup(self, turns, text: str, max_length: int, sample_id: str = "",
                        layout: VideoLayout | None = None) -> list[int]:
        """The conversation, then a user turn with `text` and the assistant's header, as the chat
        template renders them; the conversation is cut first, so that last turn stays whole."""
        messages = self._messages(turns)
        before = self._render(messages, False, layout)
        after = self._render(messages + self._messages([Turn("user", text)]), True, layout)
        if not after.startswith(before):
            raise DataError(f"sample {sample_id!r}: the chat template of {self.architecture} changes the conversation "
                            "when a turn follows it")
        tail = self._ids(after[len(before):], layout, whole=False)
        return self.encode_conversation(turns, max_length - len(tail), sample_id, layout).input_ids + tail

    # --- visual inputs and forward ----------------------------------------------------------------
    def visual_inputs(self, cache_dir) -> HFVisualInputs:
        return HFVisualInputs(self, cache_dir)

    def stack_visual(self, items: list[dict]) -> dict:
        grid = torch.stack([it["video_grid_thw"] for it in items])
        if "video_features" not in items[0]:
            return {"pixel_values_videos": torch.cat([it["pixel_values_videos"] for it in items]), "video_grid_thw": grid}
        stacked = {"video_features": torch.cat([it["video_features"] for it in items]), "video_grid_thw": grid}
        if "deepstack_features" in items[0]:
            stacked["deepstack_features"] = torch.cat([it["deepstack_features"] for it in items], dim=1)
        return stacked

    def model_inputs(self, batch: dict, device) -> dict:
        keys = ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "video_frames",
                "video_features", "deepstack_features")
        return {k: batch[k].to(device) for k in keys if k in batch}

    def _token_types(self, input_ids) -> torch.Tensor:
        return (input_ids == self.visual_slot_id).int() * 2  # text 0, image 1, video 2

    def _positions(self, input_ids, attention_mask, video_grid_thw, second_per_grid_ts=None) -> torch.Tensor:
        """Qwen's 3D rotary positions [3, B, L], the video tokens marked (without the marks
        transformers silently falls back to 1D positions)."""
        # Qwen2.5-VL: one interval per video, always given (transformers' default ran out when a batch
        # held more videos than a row has tokens); the others take none
        seconds = {"second_per_grid_ts": second_per_grid_ts} if self.positions_take_seconds else {}
        positions, _ = self.core.model.get_rope_index(input_ids, mm_token_type_ids=self._token_types(input_ids),
                                                      video_grid_thw=video_grid_thw, attention_mask=attention_mask,
                                                      **seconds)
        return positions

    def _inputs(self, input_ids, attention_mask, pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None,
                video_features=None, deepstack_features=None) -> dict:
        """The transformers model's arguments for a batch, for its forward and its inner model alike:
        the videos' pixels, which its tower then reads, or their precomputed features."""
        if pixel_values_videos is not None:
            pixel_values_videos = pixel_values_videos.to(self.vision_tower.dtype)
        encoded = None if video_features is None else {"video": self._encoder_output(video_features, deepstack_features)}
        return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values_videos=pixel_values_videos,
                    video_grid_thw=video_grid_thw, mm_token_type_ids=self._token_types(input_ids), mm_encoder_outputs=encoded,
                    position_ids=self._positions(input_ids, attention_mask, video_grid_thw, second_per_grid_ts))

    @staticmethod
    def _encoder_output(video_features, deepstack_features):
        """Precomputed features as transformers' forward takes them: per video a tensor, which it
        concatenates (one tensor of all the batch's videos is the same)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=(video_features,))

    def forward(self, input_ids, attention_mask, use_cache: bool = False, logits_to_keep: int = 0, **visual):
        # a teacher-forced pass keeps no cache (prefill asks for one): none to build, and with
        # gradient checkpointing transformers would warn that it drops it
        return self.hf(**self._inputs(input_ids, attention_mask, **visual), use_cache=use_cache, logits_to_keep=logits_to_keep)

    def hidden_states(self, input_ids, attention_mask, **visual) -> torch.Tensor:
        # the inner model (LoRA layers sit inside it): no LM head, no [B, L, vocab] logits
        return self.core.model(**self._inputs(input_ids, attention_mask, **visual), use_cache=False).last_hidden_state

    def prefill(self, input_ids, attention_mask, visual: dict) -> tuple[torch.Tensor, DecodeState]:
        inputs = self._inputs(input_ids, attention_mask, **visual)
        out = self.hf(**inputs, use_cache=True)
        # the prompt ends in text (left padding): the answer's positions continue from its last one
        return out.logits[:, -1], DecodeState(getattr(out, cache_name(self.hf)), self._last_position(inputs["position_ids"]) + 1)

    @staticmethod
    def _last_position(position_ids: torch.Tensor) -> torch.Tensor:
        return position_ids[0, :, -1]  # Qwen's 3D positions: after text the three axes are equal

    def extend(self, tokens, attention_mask, state: DecodeState) -> torch.Tensor:
        # Qwen's 3D positions: text advances all three axes alike
        return state.step(self.hf, tokens, attention_mask, state.next_positions(tokens.shape[1]).expand(3, -1, -1))

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


class Qwen25VideoLM(HFVideoLM):
    """Qwen2.5-VL: a video's temporal positions advance by the real seconds each temporal patch
    spans (second_per_grid_ts, from the sampled frames' times), not by one per patch."""

    needs_frame_rate = True
    positions_take_seconds = True

    def stack_visual(self, items: list[dict]) -> dict:
        seconds = [it["layout"].seconds_per_patch(self.frames.temporal) for it in items]
        return {**super().stack_visual(items), "second_per_grid_ts": torch.tensor(seconds)}


class Qwen3VideoLM(HFVideoLM):
    """Qwen3-VL: each temporal patch of a video is written as its time, then its own vision markers
    around its pads (`<1.5 seconds><|vision_start|><|video_pad|>...<|vision_end|>`); these replace
    the template's whole `<|vision_start|><|video_pad|><|vision_end|>`, so no outer pair encloses the
    patches (as transformers >= 5.25's processor and qwen-vl-utils write it); get_rope_index places
    each patch as a one-frame image. The vision tower also hands features of early layers to the first LM
    layers (deepstack), in the same forward pass; their mergers are projectors too."""

    needs_frame_rate = True
    samples_whole_patches = False
    projector_modules = ("visual.merger", "visual.deepstack_merger_list")

    def _vision_markers(self) -> tuple[str, str]:
        start, end = self.tokenizer.convert_ids_to_tokens([self.core.config.vision_start_token_id,
                                                           self.core.config.vision_end_token_id])
        return start, end

    def _template_video(self, text: str) -> str:
        start, end = self._vision_markers()
        wrapped = f"{start}{self.video_pad}{end}"
        return wrapped if wrapped in text else self.video_pad  # a template that writes the bare pad keeps its text

    def _video_text(self, layout: VideoLayout) -> str:
        start, end = self._vision_markers()
        return "".join(f"<{t:.1f} seconds>{start}{self.video_pad}{end}" for t in layout.times(self.frames.temporal))

    def _pad_copies(self, layout: VideoLayout) -> int:
        _, height, width = self.frames.grid(len(layout.indices))  # one temporal patch, at this video's frame size
        return height * width // self.frames.merge**2

    @staticmethod
    def _encoder_output(video_features, deepstack_features):
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        return BaseModelOutputWithDeepstackFeatures(pooler_output=(video_features,),
                                                    deepstack_features=[(layer,) for layer in deepstack_features])


class LlavaOnevisionVideoLM(HFVideoLM):
    """LLaVA-OneVision: its SigLIP tower reads each frame alone, the projector maps the patches into the
    language model, 2 x 2 pooling quarters them, and one learnt newline token closes the video. The
    template writes the video as its <video> token, which becomes the video's token count; positions
    are plain 1D ones (a Qwen2 language model). The base of the other LLaVA video families below."""

    vision_module = "vision_tower"
    projector_modules = ("multi_modal_projector", "image_newline")
    samples_whole_patches = False
    marker_keys = ("video_token_id", "image_token_id")
    crops_frames = False

    @classmethod
    def checkpoint_config(cls, hf_config) -> ModelConfig:
        side = hf_config.vision_config.image_size
        return ModelConfig(frame_size=[side, side])

    @classmethod
    def make_frames(cls, cfg: ModelConfig, hf_config, mean, std) -> TowerFrames:
        vision = hf_config.vision_config
        side = vision.image_size
        if cfg.max_video_pixels is not None:  # as frame_size: one size is all the tower reads
            raise ConfigError(f"model.max_video_pixels: {hf_config.architectures[0]} reads every frame at its vision tower's "
                              f"{side} x {side} pixels; the pixel budget is for the Qwen families, set it to null")
        if list(cfg.frame_size) != [side, side]:  # its position embeddings are learnt for that size alone
            raise ConfigError(f"model.frame_size: {list(cfg.frame_size)}, but the vision tower of this "
                              f"{hf_config.architectures[0]} checkpoint reads {side} x {side} frames; set model.frame_size: "
                              f"[{side}, {side}]")
        per_frame, extra = cls.frame_tokens(hf_config, side // vision.patch_size)
        return TowerFrames(side, vision.patch_size, per_frame, extra, cls.crops_frames, tuple(mean), tuple(std))

    @classmethod
    def frame_tokens(cls, hf_config, grid: int) -> tuple[int, int]:
        """(tokens a frame, tokens after the frames) of a tower reading `grid` x `grid` patches:
        here pooled 2 x 2 (an odd side rounds up), then the newline."""
        return math.ceil(grid / 2) ** 2, 1

    def stack_visual(self, items: list[dict]) -> dict:
        if "video_features" in items[0]:
            return {"video_features": torch.cat([it["video_features"] for it in items])}
        return {"pixel_values_videos": torch.cat([it["pixel_values_videos"] for it in items]),
                "video_frames": torch.tensor([len(it["pixel_values_videos"]) for it in items])}

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        """One video's frames [frames, 3, side, side] through the tower and projectors: [tokens, hidden]
        (each video alone: it gets its newline, and videos of different lengths share no [videos,
        frames] tensor; Video-LLaVA's come a frame a row)."""
        features = self.core.model.get_video_features(pixels.to(self.vision_tower.dtype)[None]).pooler_output
        return features.reshape(-1, features.shape[-1])

    @torch.no_grad()
    def video_features(self, pixels: dict) -> dict:
        return {"video_features": self._features(pixels["pixel_values_videos"].to(self.device)).cpu()}

    def _encoded_videos(self, pixel_values_videos, video_frames, video_features) -> dict | None:
        """The videos' features, computed here from their pixels or given, as transformers' forward
        takes them precomputed: one row of all the videos' tokens, which fill the video tokens in order."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if video_features is None and pixel_values_videos is not None:
            video_features = torch.cat([self._features(p) for p in pixel_values_videos.split(video_frames.tolist())])
        return None if video_features is None else {"video": BaseModelOutputWithPooling(pooler_output=video_features[None])}

    def _inputs(self, input_ids, attention_mask, pixel_values_videos=None, video_frames=None, video_features=None) -> dict:
        return dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=left_positions(attention_mask),
                    mm_encoder_outputs=self._encoded_videos(pixel_values_videos, video_frames, video_features))

    @staticmethod
    def _last_position(position_ids: torch.Tensor) -> torch.Tensor:
        return position_ids[:, -1]

    def extend(self, tokens, attention_mask, state: DecodeState) -> torch.Tensor:
        return state.step(self.hf, tokens, attention_mask, state.next_positions(tokens.shape[1]))


class LlavaNextVideoLM(LlavaOnevisionVideoLM):
    """LLaVA-NeXT-Video: a CLIP tower reads each frame (its short side resized, the centre cut out),
    its patch tokens (the class token dropped) are pooled `spatial_pool_stride` x `spatial_pool_stride`
    (an odd side rounds down), then projected; no newline. The llava-hf checkpoints are Vicuna
    ones: their template ends an answer with a space, and training adds the eos after it."""

    # its image_newline serves images alone
    projector_modules = ("multi_modal_projector", "vision_resampler")
    crops_frames = True
    adds_eos_after_answers = True

    @classmethod
    def frame_tokens(cls, hf_config, grid: int) -> tuple[int, int]:
        return (grid // hf_config.spatial_pool_stride) ** 2, 0


class VideoLlavaLM(LlavaOnevisionVideoLM):
    """Video-LLaVA: a video tower of its own (a CLIP, beside an image tower that videos never use)
    reads each frame (short side resized, centre cut out); all its tokens, the class token too, are
    projected, unpooled. A Vicuna checkpoint as LLaVA-NeXT-Video's: training adds the eos after
    each answer."""

    vision_module = "video_tower"
    # never run on videos, so never trained; QLoRA keeps it in full precision like the video tower
    other_towers = ("image_tower",)
    projector_modules = ("multi_modal_projector",)
    crops_frames = True
    adds_eos_after_answers = True

    @classmethod
    def frame_tokens(cls, hf_config, grid: int) -> tuple[int, int]:
        return grid**2 + 1, 0


FAMILIES = {"Qwen2VLForConditionalGeneration": HFVideoLM, "Qwen2_5_VLForConditionalGeneration": Qwen25VideoLM,
            "Qwen3VLForConditionalGeneration": Qwen3VideoLM, "LlavaOnevisionForConditionalGeneration": LlavaOnevisionVideoLM,
            "LlavaNextVideoForConditionalGeneration": LlavaNextVideoLM, "VideoLlavaForConditionalGeneration": VideoLlavaLM}


# --- building and loading -----------------------------------------------------------------------
def _image_stats(path: Path) -> tuple[list[float], list[float]]:
    """The checkpoint's normalisation (its preprocessor_config.json: a local folder's, or a hub name's)."""
    from transformers.utils import cached_file

    config = path / "preprocessor_config.json" if path.exists() else cached_file(
        str(path), "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    stats = read_json(Path(config)) if config and Path(config).is_file() else {}
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

        family = FAMILIES[arch]
        skip = ["lm_head"] + [f"model.{name}" for name in (family.vision_module, *family.other_towers, *family.projector_modules)]
        kwargs["quantization_config"] = four_bit_config(quantization, skip=skip)
    hf = _model_class(arch).from_pretrained(source, **kwargs)
    if quantised and not torch.cuda.is_available():
        from vlmalign.model.video_lm import keep_cpu_4bit_trainable

        keep_cpu_4bit_trainable(hf)
    return hf


def _set_trainable(model: HFVideoLM) -> HFVideoLM:
    cfg, core = model.cfg, model.core
    if not model.uses_lora:  # no adapter: the whole language model trains
        core.model.language_model.requires_grad_(True)
        core.lm_head.requires_grad_(True)
    model.vision_tower.requires_grad_(not cfg.vision.frozen)
    if cfg.train_projector:
        for name in model.projector_modules:
            attrgetter(name)(core.model).requires_grad_(True)
    if cfg.gradient_checkpointing:
        # later transformers 5 releases renamed it and warn on every call of the old name
        getattr(core, "activation_checkpointing_enable", core.gradient_checkpointing_enable)()
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
    family = FAMILIES[arch]
    return _set_trainable(family(own, hf, tokenizer, family.make_frames(own, hf.config, mean, std), base, arch))


def load_hf_video(path, trainable: bool = False, quantization: QuantizationConfig | None = None) -> HFVideoLM:
    """A policy saved by `HFVideoLM.save_pretrained`, or an HF checkpoint folder as it is (frozen)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / MANIFEST).is_file():  # a reference or a judge as the checkpoint ships (its own dtype)
        hf, tokenizer, mean, std, arch = _from_checkpoint(path, "auto", quantization)
        family = FAMILIES[arch]
        cfg = family.checkpoint_config(hf.config)
        base = {"hf": str(path.resolve()) if path.exists() else str(path)}
        model = family(cfg, hf, tokenizer, family.make_frames(cfg, hf.config, mean, std), base, arch)
    else:
        manifest = read_json(path / MANIFEST)
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
        family = FAMILIES[arch]
        model = family(cfg, hf, tokenizer, family.make_frames(cfg, hf.config, manifest["image_mean"], manifest["image_std"]),
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
# LLaVA-OneVision's template as the llava-hf checkpoints ship it: "<|im_start|>role " then the video's
# <video> token, then "\n" and the text, "<|im_end|>" with no newline; prompting ends "<|im_start|>assistant\n"
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}{% endfor %}"
    "{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ONEVISION_SPECIAL = ["<|im_start|>", "<|im_end|>", "<image>", "<video>"]
# The Vicuna template of the llava-hf LLaVA-NeXT-Video and Video-LLaVA checkpoints: "USER: " / "ASSISTANT: ",
# the video's "<video>\n", each text and a space; no eos after an answer; prompting ends "ASSISTANT:"
VICUNA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
VICUNA_SPECIAL = ["<image>", "<video>"]


def save_tiny_hf_video(out, words: list[str], architecture: str = "Qwen2_5_VLForConditionalGeneration",
                       hidden: int = 64, layers: int = 2, seed: int = 0, intermediate: int | None = None,
                       kv_heads: int = 2) -> Path:
    """A random tiny checkpoint of `architecture` in `out` (config.json, weights, a word-level tokenizer
    over `words` with the family's special tokens and chat template, preprocessor_config.json),
    loadable by `from_pretrained` like a hub checkpoint. Built offline."""
    from vlmalign.model.tokenizer import build_word_tokenizer

    check_architecture(architecture, "save_tiny_hf_video")
    out = Path(out)
    words = set(words) | set("system you are a helpful assistant . user".split())
    if architecture == "Qwen3VLForConditionalGeneration":  # its prompts hold each frame's time: "<12.5 seconds>"
        words |= {str(n) for n in range(100)} | {"<", ">", "seconds"}
    llava = architecture in _TINY_LLAVA
    if architecture in VICUNA_FAMILIES:
        words |= {"assistant", ":"}
        special, template, eos = VICUNA_SPECIAL, VICUNA_TEMPLATE, "</s>"
    elif llava:
        special, template, eos = ONEVISION_SPECIAL, ONEVISION_TEMPLATE, "<|im_end|>"
    else:
        special, template, eos = CHATML_SPECIAL, CHATML_TEMPLATE, "<|im_end|>"
    tokenizer = build_word_tokenizer(sorted(words))
    tokenizer.add_special_tokens({"additional_special_tokens": special, "eos_token": eos})
    if architecture in VICUNA_FAMILIES:  # a LLaMA tokenizer: its BOS starts every text it tokenizes
        from tokenizers.processors import TemplateProcessing

        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
    tokenizer.chat_template = template
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in special}
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    if llava:
        config, patch, mean, std = _TINY_LLAVA[architecture](text, ids)
    else:
        config, patch, mean, std = _tiny_qwen_config(architecture, text, ids, hidden)
    torch.manual_seed(seed)
    model = _model_class(architecture)(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    sizes = {"patch_size": patch} if llava else {"patch_size": patch, "temporal_patch_size": 2, "merge_size": 2}
    (out / "preprocessor_config.json").write_text(json.dumps({"image_mean": list(mean), "image_std": list(std), **sizes}))
    return out


def _tiny_qwen_config(architecture: str, text: dict, ids: dict, hidden: int):
    """(config, patch, mean, std) of a tiny Qwen: Qwen2-VL and Qwen2.5-VL read patches of 14 pixels with
    CLIP's normalisation, Qwen3-VL 16 with mean = std = 0.5."""
    half = hidden // 4 // 2  # rotary frequencies per head (4 heads); Qwen splits them 1 : 1.5 : 1.5 over t, h, w
    sections = [half // 4, (half - half // 4) // 2, (half - half // 4) // 2]
    patch, mean, std = 14, CLIP_MEAN, CLIP_STD
    if architecture == "Qwen3VLForConditionalGeneration":
        from transformers import Qwen3VLConfig as Config

        patch, mean, std = 16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        text = dict(text, head_dim=hidden // 4, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                                 "mrope_section": sections, "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden, patch_size=patch,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0])  # the first block's features join the first LM layer
    elif architecture == "Qwen2_5_VLForConditionalGeneration":
        from transformers import Qwen2_5_VLConfig as Config

        text = dict(text, rope_scaling={"type": "mrope", "mrope_section": sections})
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden, patch_size=patch,
                      spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1], window_size=56)
    else:
        from transformers import Qwen2VLConfig as Config

        text = dict(text, rope_scaling={"type": "mrope", "mrope_section": sections})
        vision = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=patch,
                      spatial_merge_size=2, temporal_patch_size=2)
    config = Config(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                    video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                    vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    return config, patch, mean, std


def _tiny_onevision_config(text: dict, ids: dict):
    """(config, patch, mean, std) of a tiny LLaVA-OneVision: a SigLIP tower over frames of 56 pixels
    (4 x 4 patches of 14, pooled to 2 x 2 tokens), mean = std = 0.5, a Qwen2 language model."""
    from transformers import LlavaOnevisionConfig

    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=56, patch_size=14, vision_use_head=False)
    config = LlavaOnevisionConfig(text_config=dict(model_type="qwen2", **text), vision_config=vision,
                                  image_token_index=ids["<image>"], video_token_index=ids["<video>"],
                                  vision_feature_select_strategy="full", vision_feature_layer=-1, tie_word_embeddings=False)
    return config, 14, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _tiny_clip_vision() -> dict:
    """A tiny CLIP tower over frames of 56 pixels (4 x 4 patches of 14 and a class token)."""
    return dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, image_size=56, patch_size=14, projection_dim=32)


def _tiny_next_video_config(text: dict, ids: dict):
    """(config, patch, mean, std) of a tiny LLaVA-NeXT-Video: the CLIP tower's penultimate layer without
    its class token, pooled 2 x 2 to 4 tokens a frame, CLIP's normalisation, a LLaMA language model."""
    from transformers import LlavaNextVideoConfig

    config = LlavaNextVideoConfig(text_config=dict(model_type="llama", **text), vision_config=_tiny_clip_vision(),
                                  image_token_index=ids["<image>"], video_token_index=ids["<video>"],
                                  image_grid_pinpoints=[[56, 112], [112, 56]], tie_word_embeddings=False)
    return config, 14, CLIP_MEAN, CLIP_STD


def _tiny_video_llava_config(text: dict, ids: dict):
    """(config, patch, mean, std) of a tiny Video-LLaVA: the video tower's penultimate layer, class
    token kept, 17 tokens a frame, CLIP's normalisation, a LLaMA language model."""
    from transformers import VideoLlavaConfig

    config = VideoLlavaConfig(text_config=dict(model_type="llama", **text), vision_config=_tiny_clip_vision(),
                              image_token_index=ids["<image>"], video_token_index=ids["<video>"], tie_word_embeddings=False)
    return config, 14, CLIP_MEAN, CLIP_STD


# the LLaVA families' tiny configs, and those whose llava-hf checkpoints ship the Vicuna template
_TINY_LLAVA = {"LlavaOnevisionForConditionalGeneration": _tiny_onevision_config,
               "LlavaNextVideoForConditionalGeneration": _tiny_next_video_config,
               "VideoLlavaForConditionalGeneration": _tiny_video_llava_config}
VICUNA_FAMILIES = ("LlavaNextVideoForConditionalGeneration", "VideoLlavaForConditionalGeneration")
