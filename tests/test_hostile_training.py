"""Hostile input to training (issue 15): damaged run state and checkpoints, runs killed before
their first checkpoint, metrics logged twice after a resume, non-strict / out-of-range / huge
configs, and perceptual weights that are not float safetensors. Every case must end in a
one-line `PrologueError` that names the file or field and says what to do; nothing is unpickled."""

import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from prologue_export.config import ConfigError, ModelConfig, model_preset
from prologue_export.runtime.errors import PrologueError
from prologue_export.train import common
from prologue_export.train.common import TrainError
from prologue_export.train.configs import (ARTrainConfig, TokenizerTrainConfig, ar_train_preset, load_train_config,
                                           tokenizer_train_preset)
from prologue_export.train.losses import PerceptualLoss, PerceptualWeightsError, load_perceptual
from prologue_export.train.tokenizer import train_tokenizer

FAST = ["run.compile=false", "run.num_workers=0", "run.batch_size=4", "run.log_every=1",
        "run.image_every=1000", "gan.base_channels=8", "gan_start=0"]
DATA = "synthetic:64"


def tiny_cfg(*extra):
    return load_train_config(TokenizerTrainConfig, tokenizer_train_preset, "tiny", FAST + list(extra))


def one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text, text
    assert isinstance(exc.value, PrologueError)
    return text


def steps_logged(out: Path):
    return [json.loads(line)["step"] for line in (out / common.METRICS_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny phase-1 run of 2 steps with a checkpoint at step 2."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    train_tokenizer(tiny_cfg("steps=2", "run.checkpoint_every=2"), DATA, out)
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


# ------------------------------------------------------------------ damaged train_state.json

STATE_SHAPES = {
    "empty": b"",
    "not-json": b"{step: 2,",
    "list": b"[1, 2, 3]",
    "missing-keys": b'{"step": 2}',
    "step-string": None,
    "step-negative": None,
    "step-huge": None,
    "step-bool": None,
    "nan": None,
    "optimizers-list": None,
    "rng-truncated": None,
}


def _mutated_state(name, text):
    meta = json.loads(text)
    if name == "nan":
        return text.replace('"step": 2', '"step": NaN').encode()
    meta.update({"step-string": {"step": "x"}, "step-negative": {"step": -5}, "step-huge": {"step": 1e30},
                 "step-bool": {"step": True}, "optimizers-list": {"optimizers": []},
                 "rng-truncated": {"rng": {"python": [3], "numpy": []}}}[name])
    return json.dumps(meta).encode()


@pytest.mark.parametrize("shape", list(STATE_SHAPES))
def test_damaged_train_state_is_one_line_error(run_copy, shape):
    state = run_copy / "checkpoint" / common.STATE_FILE
    content = STATE_SHAPES[shape]
    state.write_bytes(content if content is not None else _mutated_state(shape, state.read_text()))
    with pytest.raises(TrainError) as exc:
        train_tokenizer(tiny_cfg("steps=2", "run.checkpoint_every=2"), DATA, run_copy, resume=True)
    text = one_line(exc)
    assert common.STATE_FILE in text and "delete the run folder" in text


# ------------------------------------------------------------------ damaged checkpoint files


def _truncate(path: Path):
    path.write_bytes(path.read_bytes()[:100])


def _garbage(path: Path):
    path.write_bytes(b"\x00" * 64)


def _wrong_dtype(path: Path):
    from safetensors.torch import load_file

    save_file({k: torch.zeros(v.shape, dtype=torch.int64) for k, v in load_file(path).items()}, str(path))


def _wrong_shape(path: Path):
    from safetensors.torch import load_file

    save_file({k: torch.zeros(3) for k in load_file(path)}, str(path))


def _one_less(path: Path):
    from safetensors.torch import load_file

    sd = load_file(path)
    sd.pop(sorted(sd)[0])
    save_file(sd, str(path))


DAMAGE = [
    ("train_tokenizer.safetensors", _truncate),
    ("train_tokenizer.safetensors", _wrong_shape),
    ("train_tokenizer.safetensors", _one_less),
    ("train_optim_tokenizer.safetensors", _garbage),
    ("train_optim_tokenizer.safetensors", _one_less),
    ("train_ema_tokenizer.safetensors", Path.unlink),
    ("train_ema_tokenizer.safetensors", _wrong_shape),
    ("train_rng.safetensors", _truncate),
    ("train_rng.safetensors", _wrong_dtype),
    ("train_state.json", Path.unlink),
]


@pytest.mark.parametrize("name,damage", DAMAGE, ids=[f"{n}-{d.__name__}" for n, d in DAMAGE])
def test_damaged_checkpoint_files_are_one_line_errors(run_copy, name, damage):
    damage(run_copy / "checkpoint" / name)
    with pytest.raises(TrainError) as exc:
        train_tokenizer(tiny_cfg("steps=2", "run.checkpoint_every=2"), DATA, run_copy, resume=True)
    text = one_line(exc)
    assert "checkpoint" in text and "delete the run folder" in text


# ------------------------------------------------------------------ killed before the first checkpoint


def _killed_before_first_checkpoint(out: Path):
    """What a run killed before its first checkpoint leaves: config, a log, a grid, a half-written save."""
    out.mkdir(parents=True)
    (out / common.CONFIG_FILE).write_text("{}")
    (out / common.METRICS_FILE).write_text('{"step": 1, "l1": 0.5}\n{"step": 2, "l1"')
    (out / "images").mkdir()
    (out / "images" / "recon_step0000001.png").write_bytes(b"png")
    (out / ".checkpoint.tmp-abc123").mkdir()
    (out / ".checkpoint.tmp-abc123" / "tokenizer.safetensors").write_bytes(b"half")


@pytest.mark.parametrize("resume", [False, True], ids=["plain-start", "resume"])
def test_restart_after_kill_before_first_checkpoint(tmp_path, resume, capsys):
    out = tmp_path / "run"
    _killed_before_first_checkpoint(out)
    train_tokenizer(tiny_cfg("steps=1", "run.checkpoint_every=1"), DATA, out, resume=resume)
    assert steps_logged(out) == [1]
    assert json.loads((out / "checkpoint" / common.STATE_FILE).read_text())["step"] == 1
    assert not list(out.glob(".checkpoint.tmp-*"))
    err = capsys.readouterr().err
    assert ("starting from scratch" in err) == resume


def test_resume_without_checkpoint_says_so_and_starts_from_scratch(tmp_path, capsys):
    out = tmp_path / "run"
    _killed_before_first_checkpoint(out)
    common.prepare_out_dir(out, resume=True, is_main=True)
    assert common.start_or_resume(out, True, True, {"a": 1}, {}, {}, {}, "phase 1") == 0
    err = capsys.readouterr().err
    assert "no checkpoint in" in err and "starting from scratch" in err
    assert (out / common.METRICS_FILE).read_text() == ""
    assert json.loads((out / common.CONFIG_FILE).read_text()) == {"a": 1}


@pytest.mark.parametrize("resume", [False, True], ids=["plain-start", "resume"])
def test_prepare_out_dir_refuses_clearly(tmp_path, resume):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # not a file a run writes
    if resume:
        with pytest.raises(TrainError) as exc:
            common.prepare_out_dir(tmp_path / "missing", resume=True, is_main=True)
        assert "no checkpoint in" in one_line(exc) and "without --resume" in str(exc.value)
    else:
        with pytest.raises(TrainError) as exc:
            common.prepare_out_dir(out, resume=False, is_main=True)
        assert "already holds files" in one_line(exc) and "--resume" in str(exc.value)


def test_plain_start_over_a_checkpointed_run_is_refused(run_copy):
    with pytest.raises(TrainError) as exc:
        common.prepare_out_dir(run_copy, resume=False, is_main=True)
    assert "pass --resume" in one_line(exc)


# ------------------------------------------------------------------ metrics.jsonl after a resume


class _Killed(Exception):
    pass


def test_metrics_hold_each_step_once_after_resume(tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ("steps=4", "run.checkpoint_every=2")

    def kill_at_4(step):
        if step == 4:
            raise _Killed()

    monkeypatch.setattr(common, "maybe_kill_at_step", kill_at_4)
    with pytest.raises(_Killed):
        train_tokenizer(tiny_cfg(*args), DATA, out)
    assert steps_logged(out) == [1, 2, 3]  # step 3 logged, checkpoint at 2
    with open(out / common.METRICS_FILE, "a") as fh:
        fh.write('{"step": 3, "l1": 0.')  # a line torn by the kill
    monkeypatch.setattr(common, "maybe_kill_at_step", lambda step: None)
    train_tokenizer(tiny_cfg(*args), DATA, out, resume=True)
    assert steps_logged(out) == [1, 2, 3, 4]
    assert not list(out.glob(".metrics.jsonl.tmp-*"))


def test_trim_metrics_keeps_lines_up_to_the_step(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\nnot json\n[1]\n{"step": "x"}\n{"step": 3}\n{"step": 2')
    assert common.trim_metrics(log, 2) == 5
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert common.trim_metrics(log, 2) == 0
    assert common.trim_metrics(tmp_path / "absent.jsonl", 2) == 0


# ------------------------------------------------------------------ model config: strict JSON and ranges


def _model_dict():
    return json.loads(model_preset("tiny").to_json())


MODEL_BAD = [
    ('"prologue_softmax_temperature": 0.1', '"prologue_softmax_temperature": NaN', "not valid JSON"),
    ('"prologue_softmax_temperature": 0.1', '"prologue_softmax_temperature": Infinity', "not valid JSON"),
    ('"prologue_softmax_temperature": 0.1', '"prologue_softmax_temperature": -0.5', "prologue_softmax_temperature must be > 0"),
    ('"prologue_softmax_temperature": 0.1', '"prologue_softmax_temperature": 0', "prologue_softmax_temperature must be > 0"),
    ('"prologue_softmax_temperature": 0.1', '"prologue_softmax_temperature": 1e999', "not valid JSON|finite"),
    ('"vq_beta": 0.25', '"vq_beta": -1', "vq_beta must be"),
    ('"rope_theta_grid": 2000.0', '"rope_theta_grid": 0', "rope_theta_grid must be > 0"),
    ('"num_classes": 10', '"num_classes": 10000000', "num_classes must be in"),
    ('"num_classes": 10', '"num_classes": "10"', "expected an integer"),
    ('"num_classes": 10', '"num_classes": 10.5', "expected an integer"),
    ('"image_size": 32', '"image_size": 8192', "image_size must be in"),
    ('"image_size": 32', '"image_size": 30', "not a multiple of patch_size"),
    ('"channels": 1', '"channels": 0', "channels must be in"),
    ('"visual_codebook_size": 256', '"visual_codebook_size": 2000000', "visual_codebook_size must be in"),
    ('"code_dim": 14', '"code_dim": -3', "code_dim must be in"),
    ('"mlp_ratio": "8/3"', '"mlp_ratio": "1000"', "mlp_ratio must be in"),
    ('"mlp_ratio": "8/3"', '"mlp_ratio": "1/0"', "not a ratio"),
    ('"dropout": 0.0', '"dropout": 1.5', "dropout must be in"),
]


@pytest.mark.parametrize("old,new,message", MODEL_BAD, ids=[n.split(":")[0].strip('"') + "=" + n.split(": ")[1]
                                                              for _, n, _ in MODEL_BAD])
def test_model_config_rejects_bad_numbers(old, new, message):
    text = model_preset("tiny").to_json()
    assert old in text
    with pytest.raises(ConfigError, match=message) as exc:
        ModelConfig.from_json(text.replace(old, new, 1))
    one_line(exc)


HUGE = [
    ("ar", {"layers": 20000}, "ar.layers must be in"),
    ("ar", {"dim": 65536, "heads": 1024}, "ar.dim must be in"),
    ("ar", {"heads": 3}, "not divisible by heads"),
    ("ar", {"dim": 16384, "heads": 128, "layers": 256, "rope_axes": [44, 42, 42]}, "parameters"),
    ("tokenizer", {"num_prologue_tokens": 100000}, "num_prologue_tokens must be in"),
    ("tokenizer", {"image_size": 4096, "patch_size": 1}, "visual tokens"),
    ("tokenizer.encoder", {"layers": 20000}, "tokenizer.encoder.layers must be in"),
]


@pytest.mark.parametrize("where,change,message", HUGE, ids=[f"{w}-{'-'.join(c)}" for w, c, _ in HUGE])
def test_huge_sizes_are_refused_before_any_module_is_built(where, change, message, monkeypatch):
    data = _model_dict()
    target = data
    for part in where.split("."):
        target = target[part]
    target.update(change)

    def no_modules(self, *a, **k):
        raise AssertionError("a module was built before the config was refused")

    monkeypatch.setattr(torch.nn.Module, "__init__", no_modules)
    with pytest.raises(ConfigError, match=message) as exc:
        ModelConfig.from_dict(data)
    one_line(exc)


def test_huge_training_config_is_refused_before_any_module_is_built(monkeypatch):
    def no_modules(self, *a, **k):
        raise AssertionError("a module was built before the config was refused")

    monkeypatch.setattr(torch.nn.Module, "__init__", no_modules)
    with pytest.raises(ConfigError, match="joint_ar.layers must be in"):
        tiny_cfg("joint_ar.layers=20000")


# ------------------------------------------------------------------ training configs: files and overrides


TRAIN_BAD_OVERRIDES = [
    ("optim_tokenizer.lr=NaN", "expected a number"),
    ("optim_tokenizer.lr=-1", "optim_tokenizer.lr must be in"),
    ("optim_ar.betas=[0.9, 1.5]", r"optim_ar.betas\[1\] must be in"),
    ("optim_disc.weight_decay=-0.1", "weight_decay must be"),
    ("run.steps=-5", "run.steps must be in"),
    ("run.steps=1e30", "expected an integer"),
    ("run.steps=\"x\"", "expected an integer"),
    ("run.seed=-1", "run.seed must be in"),
    ("run.batch_size=0", "run.batch_size must be in"),
    ("gan.base_channels=100000", "gan.base_channels must be in"),
    ("l1_weight=Infinity", "expected a number"),
    ("tokenizer.prologue_softmax_temperature=-0.1", "prologue_softmax_temperature must be > 0"),
    ("visual_input_dropout=2", "visual_input_dropout must be in"),
    ("ema_halflife=-1", "ema_halflife must be"),
]


@pytest.mark.parametrize("override,message", TRAIN_BAD_OVERRIDES, ids=[o for o, _ in TRAIN_BAD_OVERRIDES])
def test_tokenizer_training_overrides_are_checked(override, message):
    with pytest.raises(ConfigError, match=message) as exc:
        tiny_cfg(override)
    one_line(exc)


AR_BAD = [("sample_cfg=-1", "sample_cfg must be in"), ("sample_cfg=NaN", "expected a number"),
          ("sample_classes=0", "sample_classes must be in"), ("label_drop=1.5", "label_drop must be in"),
          ("optim.grad_clip=-1", "optim.grad_clip must be")]


@pytest.mark.parametrize("override,message", AR_BAD, ids=[o for o, _ in AR_BAD])
def test_ar_training_overrides_are_checked(override, message):
    with pytest.raises(ConfigError, match=message) as exc:
        load_train_config(ARTrainConfig, ar_train_preset, "tiny", [override])
    one_line(exc)


@pytest.mark.parametrize("text,message", [
    ('{"num_classes": NaN}', "not valid JSON"),
    ('{"num_classes": Infinity}', "not valid JSON"),
    ("", "not valid JSON"),
    ("[1, 2]", "must be an object"),
    ("[" * 100 + "]" * 100, "nested too deeply|must be an object"),
])
def test_training_config_files_are_strict_json(tmp_path, text, message):
    path = tmp_path / "cfg.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as exc:
        load_train_config(TokenizerTrainConfig, tokenizer_train_preset, str(path), [])
    assert "cfg.json" in one_line(exc)


def test_training_config_file_nan_inside_a_full_config(tmp_path):
    import dataclasses

    text = json.dumps(dataclasses.asdict(tokenizer_train_preset("tiny")))
    path = tmp_path / "full.json"
    path.write_text(text.replace('"prologue_softmax_temperature": 0.1', '"prologue_softmax_temperature": NaN'))
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_train_config(TokenizerTrainConfig, tokenizer_train_preset, str(path), [])
    path.write_text(text)
    assert load_train_config(TokenizerTrainConfig, tokenizer_train_preset, str(path), []).tokenizer.image_size == 32


# ------------------------------------------------------------------ perceptual weights


def _vgg_state(dtype=torch.float32):
    return {k: torch.randn(v.shape).to(dtype) for k, v in PerceptualLoss().state_dict().items()
            if k.startswith("features.")}


def _write_bad_perceptual(case: str, tmp_path: Path) -> Path:
    path = tmp_path / ("vgg.pt" if case == "pt-extension" else "vgg.safetensors")
    if case == "int64":
        save_file(_vgg_state(torch.int64), str(path))
    elif case in ("pickle-bytes", "pt-extension"):
        path.write_bytes(pickle.dumps({"features.0.weight": [1.0, 2.0]}))
    elif case == "torch-save-zip":
        torch.save(_vgg_state(), path)
    elif case == "missing-tensors":
        sd = _vgg_state()
        sd.pop("features.2.weight")
        save_file(sd, str(path))
    elif case == "wrong-shape":
        save_file({**_vgg_state(), "features.0.weight": torch.zeros(3, 3)}, str(path))
    elif case == "nan":
        sd = _vgg_state()
        sd["features.0.bias"][0] = float("nan")
        save_file(sd, str(path))
    elif case == "empty":
        path.write_bytes(b"")
    return path


PERCEPTUAL_CASES = {"int64": "int64, expected floating point", "pickle-bytes": "never unpickled",
                    "pt-extension": "vgg.pt", "torch-save-zip": "never unpickled",
                    "missing-tensors": "features.2.weight", "wrong-shape": "features.0.weight",
                    "nan": "NaN", "empty": "cannot read perceptual weights"}


@pytest.mark.parametrize("case", list(PERCEPTUAL_CASES))
def test_bad_perceptual_weights(case, tmp_path, monkeypatch):
    path = _write_bad_perceptual(case, tmp_path)

    def no_unpickling(*a, **k):
        raise AssertionError("the perceptual weights were unpickled")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    if case != "pt-extension":  # .pt/.pth go through torch.load(weights_only=True): tensors and containers only
        monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(PerceptualWeightsError) as exc:
        load_perceptual(path)
    text = one_line(exc)
    assert path.name in text and PERCEPTUAL_CASES[case] in text


def test_float16_perceptual_weights_are_fine(tmp_path):
    path = tmp_path / "vgg16.safetensors"
    save_file(_vgg_state(torch.float16), str(path))
    assert isinstance(load_perceptual(path), PerceptualLoss)


# ------------------------------------------------------------------ the perceptual loss never switches off silently
# (issue 25 item 2): the released-scale presets need perceptual_weights=PATH or =none; VGG needs the LPIPS heads


def _lpips_state(heads: bool):
    return {k: torch.randn(v.shape) for k, v in PerceptualLoss().state_dict().items()
            if k.startswith("features.") or (heads and k.startswith("lin"))}


@pytest.mark.parametrize("preset", ["prologue-b", "2d"])
def test_released_presets_refuse_to_start_without_perceptual_weights(preset, tmp_path, capsys, monkeypatch):
    from prologue_export.cli import main
    from prologue_export.train import tokenizer as phase1

    def no_data(*a, **k):
        raise AssertionError("the data was opened")

    monkeypatch.setattr(phase1, "open_dataset", no_data)
    out = tmp_path / "runs" / "b"
    rc = main(["train", "tokenizer", "--config", preset, "--data", "synthetic:8", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err and err.count("\n") == 1, err
    assert "perceptual_weights is required" in err and "LPIPS-VGG16 file with its 'lin' heads" in err, err
    assert "ConvNeXt-S for prologue-l" in err and "perceptual_weights=none" in err, err
    assert not (tmp_path / "runs").exists()  # refused before any run folder
    with pytest.raises(ConfigError) as exc:  # the same for a config built in Python
        load_train_config(TokenizerTrainConfig, tokenizer_train_preset, preset, [])
    assert "perceptual_weights=PATH" in one_line(exc)


@pytest.mark.parametrize("spelling", ["none", '"none"', "None"])
def test_explicit_none_turns_the_perceptual_loss_off_on_purpose(spelling):
    cfg = load_train_config(TokenizerTrainConfig, tokenizer_train_preset, "prologue-b", [f"perceptual_weights={spelling}"])
    assert cfg.perceptual_file() is None and cfg.perceptual_weights.lower() == "none"
    assert cfg.perceptual_weight == 1.0  # only the file says "off"; the recipe's weight is kept


def test_explicit_none_is_recorded_and_said(tmp_path, capsys):
    out = tmp_path / "run"
    train_tokenizer(tiny_cfg("steps=1", "perceptual_weights=none"), DATA, out)
    assert json.loads((out / common.CONFIG_FILE).read_text())["perceptual_weights"] == "none"
    assert "[phase 1] perceptual_weights=none: training without the perceptual loss" in capsys.readouterr().err


def test_tiny_presets_keep_the_loss_off_and_old_configs_still_load(tmp_path):
    for name in ("tiny", "tiny-2d", "tiny-post"):
        cfg = tokenizer_train_preset(name)
        assert cfg.perceptual_weights is None and cfg.perceptual_file() is None
    # a released-scale run saved before "none"/"REQUIRED" existed (null) resumes as it was trained: no loss
    old = dataclasses.asdict(tokenizer_train_preset("prologue-b"))
    old["perceptual_weights"] = None
    path = tmp_path / "train_config.json"
    path.write_text(json.dumps(old))
    assert load_train_config(TokenizerTrainConfig, tokenizer_train_preset, str(path), []).perceptual_file() is None
    # perceptual_weight 0 turns it off too, without a file
    assert load_train_config(TokenizerTrainConfig, tokenizer_train_preset, "2d",
                             ["perceptual_weight=0"]).perceptual_file() is None


def test_vgg_without_lpips_heads_is_refused_for_the_lpips_loss(tmp_path):
    from prologue_export.train.tokenizer import load_perceptual_loss

    bare, full = tmp_path / "vgg16_features.safetensors", tmp_path / "lpips_vgg16.safetensors"
    save_file(_lpips_state(heads=False), str(bare))
    save_file(_lpips_state(heads=True), str(full))
    assert not load_perceptual(bare).has_lpips_weights  # the loss module itself still reads such a file
    cfg = load_train_config(TokenizerTrainConfig, tokenizer_train_preset, "prologue-b",
                            [f"perceptual_weights={json.dumps(str(full))}"])
    assert load_perceptual_loss(cfg).has_lpips_weights
    out = tmp_path / "runs" / "run"
    with pytest.raises(PerceptualWeightsError) as exc:  # a phase-1 run refuses it, and leaves no run folder
        train_tokenizer(tiny_cfg("steps=1", f"perceptual_weights={json.dumps(str(bare))}"), DATA, out)
    text = one_line(exc)
    assert bare.name in text and "without the LPIPS heads (lin0..lin4.model.1.weight)" in text
    assert "perceptual_weights=none" in text
    assert not (tmp_path / "runs").exists()
