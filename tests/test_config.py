import json

import pytest

from prologue_export.config import (
    AR_PRESETS, MODEL_PRESETS, TOKENIZER_PRESETS, ConfigError, ModelConfig, SamplingConfig,
    ar_preset, model_preset, tokenizer_preset,
)


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_json_round_trip(name):
    cfg = model_preset(name)
    again = ModelConfig.from_json(cfg.to_json())
    assert again == cfg
    assert again.to_json() == cfg.to_json()


def test_every_preset_name_resolves():
    for tok in TOKENIZER_PRESETS:
        tokenizer_preset(tok).validate()
    for ar in AR_PRESETS:
        ar_preset(ar).validate()
    assert model_preset("prologue-b+joint-small").ar.layers == 7


def _dict(name="tiny"):
    return json.loads(model_preset(name).to_json())


def test_unknown_key_is_named():
    d = _dict()
    d["tokenizer"]["patch_sise"] = 4
    with pytest.raises(ConfigError, match=r"config\.tokenizer: unknown key\(s\) patch_sise"):
        ModelConfig.from_dict(d)


def test_missing_key_is_named():
    d = _dict()
    del d["tokenizer"]["encoder"]["heads"]
    with pytest.raises(ConfigError, match=r"config\.tokenizer\.encoder\.heads: missing required key"):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize(
    "path,value,message",
    [
        (("num_classes",), "10", r"config\.num_classes: expected an integer"),
        (("tokenizer", "image_size"), 32.0, r"config\.tokenizer\.image_size: expected an integer"),
        (("tokenizer", "rope_axes"), "10,10,12", r"config\.tokenizer\.rope_axes: expected a list"),
        (("ar", "rope_theta"), True, r"config\.ar\.rope_theta: expected a number"),
        (("tokenizer", "variant"), 2, r"config\.tokenizer\.variant: expected a string"),
    ],
)
def test_ill_typed_key_is_named(path, value, message):
    d = _dict()
    target = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(d)


def test_inconsistent_sizes_are_refused():
    d = _dict()
    d["ar"]["rope_axes"] = [24, 20, 20]  # head dim of the tiny AR is 32
    with pytest.raises(ConfigError, match="rope_axes .* sum to 64, but the head dim is 32"):
        ModelConfig.from_dict(d)
    d = _dict()
    d["format_version"] = 99
    with pytest.raises(ConfigError, match="format_version 99"):
        ModelConfig.from_dict(d)


def _version_1(d):
    """`d` (a current config dict) as format version 1 wrote it."""
    tok = d["tokenizer"]
    d["tokenizer"] = {("prologue_temperature" if k == "prologue_softmax_temperature" else k): v for k, v in tok.items()}
    return {**d, "format_version": 1}


def test_version_1_config_is_migrated():
    """Version 1 named the tokenizer's straight-through softmax temperature `prologue_temperature`."""
    old = _version_1(_dict())
    old["tokenizer"]["prologue_temperature"] = 0.25
    text = json.dumps(old)
    cfg = ModelConfig.from_json(text)
    assert cfg.format_version == 2 and cfg.tokenizer.prologue_softmax_temperature == 0.25
    assert json.loads(text) == old  # the caller's dict is not changed
    assert "prologue_temperature" not in cfg.to_dict()["tokenizer"]
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    new_key_in_old = _version_1(_dict())
    new_key_in_old["tokenizer"]["prologue_softmax_temperature"] = 0.1
    current_with_old_key = {**_version_1(_dict()), "format_version": 2}
    for bad in (new_key_in_old, current_with_old_key):
        with pytest.raises(ConfigError, match=r"config\.tokenizer: unknown key\(s\) prologue_temperature"):
            ModelConfig.from_dict(bad)


def test_version_1_checkpoint_loads(tmp_path):
    import torch

    import prologue_export as pe

    torch.manual_seed(0)
    model = pe.PrologueModel(model_preset("tiny"))
    pe.save_checkpoint(model, tmp_path / "ckpt")
    cfg_file = tmp_path / "ckpt" / "config.json"
    cfg_file.write_text(json.dumps(_version_1(json.loads(cfg_file.read_text()))))
    loaded = pe.load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_training_configs_written_before_the_rename_still_load_and_resume(tmp_path):
    """A training config file (no version of its own) and a run's saved config with the old
    tokenizer key: the file loads, and resuming that run is not refused as another config."""
    import dataclasses

    from prologue_export.train.common import TrainError, check_resume_config
    from prologue_export.train.configs import load_train_config, tokenizer_train_preset

    current = dataclasses.asdict(tokenizer_train_preset("tiny"))
    old = json.loads(json.dumps(current))
    old["tokenizer"]["prologue_temperature"] = old["tokenizer"].pop("prologue_softmax_temperature")
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = load_train_config(type(tokenizer_train_preset("tiny")), tokenizer_train_preset, str(tmp_path / "old.json"), [])
    assert dataclasses.asdict(loaded) == current
    check_resume_config(old, current, tmp_path)  # the same run
    other = json.loads(json.dumps(old))
    other["tokenizer"]["prologue_temperature"] = 0.5
    with pytest.raises(TrainError, match="differs in: tokenizer"):
        check_resume_config(other, current, tmp_path)


def test_vocab_layout_of_released_shapes():
    v = model_preset("prologue-b-b").vocab()
    assert (v.vocab_size, v.prologue_offset, v.eos_id, v.seq_len) == (17409, 16384, 17408, 273)
    v = model_preset("prologue-l-b").vocab()
    assert (v.vocab_size, v.eos_id) == (5121, 5120)
    v = model_preset("2d-base").vocab()
    assert (v.vocab_size, v.eos_id, v.seq_len) == (16384, None, 256)


def test_sampling_official_names():
    s = SamplingConfig.coerce({"semantic_cfg_schedule": "constant", "semantic_cfg_scale": 0.7,
                               "visual_cfg_schedule": "cosine", "visual_cfg_scale": 3.75,
                               "visual_cfg_power": 0.2, "semantic_temperature": 0.7, "topK": 5.0, "topP": 0.8})
    assert s.prologue_cfg_scale == 0.7 and s.visual_cfg_power == 0.2 and s.prologue_temperature == 0.7
    assert s.top_k == 5 and isinstance(s.top_k, int) and s.segmented
    assert SamplingConfig.coerce({"top_k": 3}).top_k == 3  # our own names work too
    with pytest.raises(ConfigError, match="'cfg_scale' is not an official sampling option"):
        SamplingConfig.coerce({"cfg_scale": 2.0})
    with pytest.raises(ConfigError, match="sampling.temperature must be a finite number > 0"):
        SamplingConfig.coerce({"temperature": 0.0})
    with pytest.raises(ConfigError, match="not one of constant, linear, cosine"):
        SamplingConfig.coerce({"cfg_schedule": "exp"})
