"""Everything that samples runs on the model's device, checked without a GPU: the model on `meta`.

A tensor on `meta` has a shape and a dtype but no data, and torch refuses any op that mixes it
with a CPU tensor ("Tensor on device cpu is not on the expected device meta!") and any copy of its
values to the host (`.cpu()`, `.item()`, `int(t)`). So a sampler that runs here end to end has no
mixed-device op and no hidden host sync: exactly what a CUDA (or any other) device needs. The one
intended host copy, `prologue_export.sampling.to_host`, is replaced by zeros of the right shape
and dtype for meta tensors; the tokenizer's value check on the ids (a host sync, see
`_decode_without_value_check`) is skipped, since meta tensors have no values.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import prologue_export as pe
import prologue_export.sampling as sampling_mod
from prologue_export.config import model_preset
from prologue_export.model import PrologueModel

META = torch.device("meta")
real_to_host = sampling_mod.to_host


def fake_to_host(x: torch.Tensor) -> np.ndarray:
    """`to_host` for meta tensors: zeros of the shape and dtype the copy would have."""
    if x.is_meta:
        return np.zeros(tuple(x.shape), dtype=torch.empty((), dtype=x.dtype).numpy().dtype)
    return real_to_host(x)


def _decode_without_value_check(tokenizer):
    """`tokenizer.decode` minus its id range check (`int(ids.min())`: a host sync, no values on meta)."""
    def decode(visual_ids):
        assert visual_ids.dim() == 2 and visual_ids.shape[1] == tokenizer.cfg.num_visual_tokens
        return tokenizer.decode_codes(tokenizer.visual_quantizer.codes(visual_ids))
    return decode


@pytest.fixture
def on_meta(monkeypatch):
    """A tiny model moved to meta (built on the CPU first, as a model moved to a GPU would be)."""
    import prologue_export.train.ar as train_ar

    monkeypatch.setattr(sampling_mod, "to_host", fake_to_host)
    monkeypatch.setattr(train_ar, "to_host", fake_to_host)
    model = PrologueModel(model_preset("tiny")).eval().to(META)
    monkeypatch.setattr(model.tokenizer, "decode", _decode_without_value_check(model.tokenizer))
    assert all(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    return model


def test_meta_refuses_mixed_devices_and_host_copies():
    """The premise: on meta, the old bug (CPU logits + the model's mask) and any copy out raise."""
    logits, mask = torch.zeros(2, 5), torch.zeros(5, device=META)
    with pytest.raises(RuntimeError, match="device"):
        logits / 1.0 + mask
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.zeros(2, 5, device=META).cpu()
    with pytest.raises(RuntimeError):
        int(torch.zeros((), device=META))


# name -> (settings, return_probs): every sampling mode once; half of them report the distributions
CASES = {
    "no_cfg": ({"cfg": 0.0}, True),
    "cfg": ({"cfg": 2.0}, False),
    "cfg_linear": ({"cfg": 3.0, "cfg_schedule": "linear", "cfg_power": 2.0}, True),
    "split_cfg": ({"prologue_cfg_schedule": "cosine", "prologue_cfg_scale": 4.0, "visual_cfg_schedule": "linear",
                   "visual_cfg_scale": 1.5}, False),
    "split_cfg_one_segment": ({"visual_cfg_schedule": "constant", "visual_cfg_scale": 2.5}, True),
    "temperatures": ({"cfg": 2.0, "temperature": 0.7, "prologue_temperature": 1.3}, False),
    "top_k": ({"cfg": 2.0, "top_k": 5}, True),
    "top_p": ({"cfg": 0.0, "top_p": 0.8}, False),
    "top_k_top_p": ({"cfg": 2.0, "top_k": 20, "top_p": 0.9}, True),
    "greedy": ({"cfg": 2.0, "top_k": 1}, True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sampler_runs_on_the_model_device(on_meta, name):
    settings, return_probs = CASES[name]
    vocab = on_meta.config.vocab()
    out = pe.sample(on_meta.ar, [0, 3, 10], settings, seed=0, return_probs=return_probs)
    tokens, probs = out if return_probs else (out, None)
    assert tokens.is_meta and tokens.shape == (3, vocab.seq_len) and tokens.dtype == torch.long
    if return_probs:
        assert probs.is_meta and probs.shape == (3, vocab.seq_len, vocab.vocab_size) and probs.dtype == torch.float32


def test_sampler_without_prologue_on_the_model_device(on_meta):
    ar = PrologueModel(model_preset("tiny-2d")).eval().ar.to(META)
    tokens = pe.sample(ar, [1, 10], {"cfg": 2.0, "top_p": 0.9}, seed=0)
    assert tokens.is_meta and tokens.shape == (2, ar.vocab.seq_len)


@pytest.mark.parametrize("kind", ["numpy", "cpu_tensor"])
def test_sampler_fixed_prologue_and_uniform_noise_on_the_model_device(on_meta, kind):
    """Host inputs (numpy or CPU tensors) go to the model's device; the results stay there."""
    vocab = on_meta.config.vocab()
    prologue = np.arange(2 * vocab.num_prologue_tokens).reshape(2, -1) % vocab.prologue_codebook_size
    uniform = np.full((2, vocab.seq_len, vocab.vocab_size), 0.5, dtype=np.float32)
    if kind == "cpu_tensor":
        prologue, uniform = torch.from_numpy(prologue), torch.from_numpy(uniform)
    tokens, probs = pe.sample(on_meta.ar, [1, 2], {"cfg": 2.0}, uniform=uniform, prologue_ids=prologue,
                              return_probs=True)
    assert tokens.is_meta and probs.is_meta and tokens.shape == (2, vocab.seq_len)
    _, visual = pe.split_tokens(tokens, vocab)
    assert visual.is_meta and visual.shape == (2, vocab.num_visual_tokens)


def test_sampler_on_meta_with_bf16_weights(on_meta):
    ar = on_meta.ar.to(torch.bfloat16)
    assert pe.sample(ar, [4], {"cfg": 2.0, "top_k": 5}, seed=1).is_meta


def test_training_sample_grid_on_the_model_device(on_meta, tmp_path):
    from PIL import Image

    from prologue_export.train.ar import _sample_grid

    cfg = SimpleNamespace(sample_classes=2, sample_cfg=2.0)
    _sample_grid(on_meta.ar, on_meta.tokenizer, on_meta.config, cfg, tmp_path / "grid.png")
    size = on_meta.config.tokenizer.image_size
    assert Image.open(tmp_path / "grid.png").size == (8 * (size + 1) + 1, 2 * (size + 1) + 1)


def test_gfid_sampling_on_the_model_device(on_meta):
    from prologue_export.train import metrics

    cfg = on_meta.config.tokenizer
    images = metrics.sample_images(on_meta, np.arange(3) % 10, {"cfg": 2.0}, seed=0, batch_size=2)
    assert images.shape == (3, cfg.image_size, cfg.image_size, cfg.channels) and images.dtype == np.uint8


def test_gfid_checkpoint_path_loads_onto_the_device(on_meta, tmp_path, monkeypatch):
    """`generate_images(checkpoint=..., device=...)` loads the model there and samples there."""
    import prologue_export.checkpoint as checkpoint_mod
    from prologue_export.train import metrics

    pe.save_checkpoint(PrologueModel(model_preset("tiny")), tmp_path / "ckpt")
    loaded = []
    real_load = checkpoint_mod.load_checkpoint

    def load(path, device="cpu"):
        model = real_load(path, device=device)
        model.tokenizer.decode = _decode_without_value_check(model.tokenizer)
        loaded.append(model)
        return model

    monkeypatch.setattr(checkpoint_mod, "load_checkpoint", load)
    images = metrics.generate_images(2, 10, {"cfg": 2.0}, seed=0, checkpoint=tmp_path / "ckpt", device="meta")
    assert loaded[0].ar.token_emb.weight.is_meta
    assert images.shape[0] == 2 and images.dtype == np.uint8


def test_results_stay_on_the_cpu_for_a_cpu_model():
    """On the CPU nothing moves: tokens and probabilities are CPU tensors (numpy-able as before)."""
    model = PrologueModel(model_preset("tiny")).eval()
    tokens, probs = pe.sample(model.ar, [1, 2], {"cfg": 2.0}, seed=0, return_probs=True)
    assert tokens.device.type == "cpu" and probs.device.type == "cpu"
    assert tokens.numpy().shape == (2, model.config.vocab().seq_len)
