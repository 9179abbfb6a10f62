import pytest

from vlmalign.config import SFTConfig, load_config, save_config
from vlmalign.errors import ConfigError


def write(path, text):
    path.write_text(text)
    return path


def test_base_include_and_overrides(tmp_path):
    write(tmp_path / "model.yaml", "model:\n  num_frames: 8\n  projector: linear\n")
    cfg_file = write(tmp_path / "sft.yaml", "base: model.yaml\nmodel:\n  num_frames: 12\ntrain:\n  lr: 1e-4\n")
    cfg = load_config(SFTConfig, cfg_file, ["train.batch_size=3", "data.train=[a.json, b.json]"])
    assert cfg.model.num_frames == 12  # the including file wins over its base
    assert cfg.model.projector == "linear"  # inherited from the base
    assert cfg.train.lr == pytest.approx(1e-4)  # YAML reads 1e-4 as a string; float fields accept it
    assert cfg.train.batch_size == 3
    assert cfg.data.train == ["a.json", "b.json"]


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    cfg_file = write(tmp_path / "bad.yaml", "train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(SFTConfig, cfg_file)
    msg = str(err.value)
    assert "train.lrr" in msg and str(cfg_file) in msg and "did you mean 'train.lr'" in msg
    assert "\n" not in msg


def test_unknown_key_in_base_names_the_base_file(tmp_path):
    write(tmp_path / "base.yaml", "model:\n  num_frame: 8\n")
    cfg_file = write(tmp_path / "top.yaml", "base: base.yaml\n")
    with pytest.raises(ConfigError, match=r"model\.num_frame.*base\.yaml.*model\.num_frames"):
        load_config(SFTConfig, cfg_file)


def test_wrong_type_and_literal(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.batch_size: expected an integer.*--set"):
        load_config(SFTConfig, None, ["train.batch_size=four"])
    with pytest.raises(ConfigError, match=r"model\.projector.*did you mean 'mlp2x_gelu'"):
        load_config(SFTConfig, None, ["model.projector=mlp2x_gelo"])
    with pytest.raises(ConfigError, match="true or false"):
        load_config(SFTConfig, None, ["model.vision.frozen=3"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(SFTConfig, tmp_path / "nope.yaml")
    bad = write(tmp_path / "broken.yaml", "train: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(SFTConfig, bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(SFTConfig, None, ["train.lr=0.5", "model.lora.enabled=true"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(SFTConfig, tmp_path / "config.yaml") == cfg


def test_bundled_configs_load_and_chain():
    """Every stage config loads with its schema, and every `runs/.../final` a config starts from is
    the output of another bundled config (a recipe never points at a model nothing trains)."""
    import re
    from pathlib import Path

    from vlmalign.config import DPOConfig, GRPOConfig, InstructionsConfig, PPOConfig, PrefsConfig, RMConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    schema = [("sft", SFTConfig), ("rm", RMConfig), ("ppo", PPOConfig), ("isr_dpo", DPOConfig), ("dpo", DPOConfig),
              ("prefs", PrefsConfig), ("grpo", GRPOConfig), ("instructions", InstructionsConfig)]
    run_dirs, starts = set(), []
    for folder in ("tiny", "vlm_rlaif", "llava_hound", "isr_dpo", "oracle_rlaif", "qwen2_5_vl", "llava_onevision",
                   "llava_next_video", "video_llava"):
        for path in sorted((root / folder).glob("*.yaml")):
            if path.stem.startswith("model"):
                continue  # model sections, included by the stage configs
            cls = next(c for prefix, c in schema if path.stem.startswith(prefix))
            cfg = load_config(cls, path)
            run_dirs.add(cfg.run.dir)
            starts += [(path, m) for m in re.findall(r"runs/[\w/-]+(?=/final)", path.read_text())]
    assert len(run_dirs) >= 17
    for path, start in starts:
        assert start in run_dirs, f"{path} starts from {start}/final, which no bundled config writes"


def test_recipes_start_where_their_papers_start():
    """ISR-DPO's first iteration starts from the SFT model after DPO on seed preference data (LLaVA-Hound's
    DPO), not from the SFT model; Oracle-RLAIF's loss averages within each answer, then over the group (Eq. 6)."""
    from pathlib import Path

    from vlmalign.config import DPOConfig, GRPOConfig, RMConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    isr = load_config(DPOConfig, root / "isr_dpo" / "isr_dpo_7b.yaml")
    seed_dpo = load_config(DPOConfig, root / "llava_hound" / "dpo_7b.yaml")
    assert isr.model.init_from == f"{seed_dpo.run.dir}/final" and isr.loop.iterations == 9
    oracle_rlaif = load_config(GRPOConfig, root / "oracle_rlaif" / "grpo_rank_7b.yaml")
    assert (oracle_rlaif.grpo.loss, oracle_rlaif.grpo.reference) == ("grpo", "epoch")  # Eq. 6, Algorithm 1
    # its oracle is a reward model trained by the bundled RM recipe; the API ranker is the alternative
    rm = load_config(RMConfig, root / "oracle_rlaif" / "rm_7b.yaml")
    assert (oracle_rlaif.judge.backend, oracle_rlaif.judge.model) == ("reward", f"{rm.run.dir}/final")
    assert load_config(GRPOConfig, root / "oracle_rlaif" / "grpo_rank_7b_api.yaml").judge.backend == "openai"
    # the Qwen2.5-VL-7B chain: SFT -> DPO and GRPO_rank, each from the SFT run, LoRA on the LLM only
    from vlmalign.config import SFTConfig

    qwen_sft = load_config(SFTConfig, root / "qwen2_5_vl" / "sft_7b.yaml")
    qwen_dpo = load_config(DPOConfig, root / "qwen2_5_vl" / "dpo_7b.yaml")
    qwen_grpo = load_config(GRPOConfig, root / "qwen2_5_vl" / "grpo_rank_7b.yaml")
    assert qwen_sft.model.init_from == "Qwen/Qwen2.5-VL-7B-Instruct" and qwen_sft.model.lora.enabled
    assert qwen_dpo.model.init_from == qwen_grpo.model.init_from == f"{qwen_sft.run.dir}/final"
    assert qwen_grpo.model.frame_size == [336, 336] and qwen_grpo.grpo.reference == "epoch"
    # LLaVA-OneVision-7B DPO from the hub checkpoint: 16 frames at its tower's 384 pixels (196 pooled
    # tokens each, and a newline) leave room for a 256-token answer within max_length
    onevision = load_config(DPOConfig, root / "llava_onevision" / "dpo_7b.yaml")
    assert onevision.model.init_from == "llava-hf/llava-onevision-qwen2-7b-ov-hf" and onevision.model.lora.enabled
    assert onevision.model.frame_size == [384, 384]
    assert onevision.model.num_frames * 14 * 14 + 1 + 256 < onevision.data.max_length
    # LLaVA-NeXT-Video-7B and Video-LLaVA-7B DPO from their hub checkpoints, at the frames they were
    # trained on: 32 frames of 144 pooled CLIP tokens at 336 pixels; 8 frames of 257 (16 x 16 patches
    # and the class token) at 224; each with room for a 256-token answer
    next_video = load_config(DPOConfig, root / "llava_next_video" / "dpo_7b.yaml")
    video_llava = load_config(DPOConfig, root / "video_llava" / "dpo_7b.yaml")
    assert next_video.model.init_from == "llava-hf/LLaVA-NeXT-Video-7B-hf"
    assert video_llava.model.init_from == "LanguageBind/Video-LLaVA-7B-hf"
    assert (next_video.model.frame_size, video_llava.model.frame_size) == ([336, 336], [224, 224])
    assert next_video.model.num_frames * (336 // 14 // 2) ** 2 + 256 < next_video.data.max_length
    assert video_llava.model.num_frames * ((224 // 14) ** 2 + 1) + 256 < video_llava.data.max_length <= 4096
    assert next_video.model.lora.enabled and video_llava.model.lora.enabled
    assert next_video.model.max_video_pixels is video_llava.model.max_video_pixels is None  # their towers read one size


def test_a_resumed_run_notes_changed_keys_but_not_keys_added_since(tmp_path):
    """A run written before a config key existed used its default: resuming it with the default is
    no change, with another value it is."""
    import yaml

    from vlmalign.config import SFTConfig, to_dict
    from vlmalign.train.common import config_changes

    cfg = SFTConfig()
    written = to_dict(cfg)
    del written["model"]["frame_size"]  # as saved before the key existed
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(written))
    assert config_changes(saved, cfg) == []
    cfg.model.frame_size = [56, 56]
    cfg.train.lr = 1.0
    assert config_changes(saved, cfg) == ["model.frame_size", "train.lr"]
