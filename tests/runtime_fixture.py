"""Builds the bundle and the torch reference outputs that the runtime tests compare against.

`python -m tests.runtime_fixture DIR` (torch environment) writes DIR/bundle, DIR/bundle2d,
DIR/bundle_trt (DIR/bundle with its fp32 TensorRT ONNX forms) and DIR/reference.npz, so that the
runtime tests can also run in an environment without torch.
"""

import sys
from pathlib import Path

import numpy as np

CASES = {
    # name: (class ids, settings, seed)
    "cfg_split": ([1, 2, 3, 10], {"semantic_cfg_schedule": "constant", "semantic_cfg_scale": 0.7,
                                  "visual_cfg_schedule": "cosine", "visual_cfg_scale": 3.0,
                                  "visual_cfg_power": 0.5}, 0),
    "no_cfg": ([4, 5], {"cfg": 0.0, "semantic_temperature": 0.8, "temperature": 0.9, "topK": 30, "topP": 0.95}, 7),
}


def build(root) -> Path:
    import torch

    import prologue_export as pe
    from prologue_export.model import PrologueModel
    from prologue_export.config import model_preset
    from prologue_export.export.bundle import export_bundle
    from tests.conftest import randomize_

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, preset in (("bundle", "tiny"), ("bundle2d", "tiny-2d")):
        model = randomize_(PrologueModel(model_preset(preset)), seed=11).eval()
        ckpt = root / f"ckpt_{name}"
        pe.save_checkpoint(model, ckpt)
        export_bundle(ckpt, root / name, max_batch=4, force=True, verify=False, log=lambda m: None)
        if name != "bundle":
            continue
        vocab = model.config.vocab()
        for case, (classes, settings, seed) in CASES.items():
            tokens = pe.sample(model.ar, classes, settings, seed=seed)
            _, visual = pe.split_tokens(tokens, vocab)
            with torch.no_grad():
                image = model.tokenizer.decode(visual)
            pixels = torch.floor(torch.clamp(127.5 * image + 128, 0, 255)).to(torch.uint8)
            arrays[f"{case}_tokens"] = tokens.numpy()
            arrays[f"{case}_images"] = pixels.permute(0, 2, 3, 1).numpy()
            arrays[f"{case}_images_float"] = image.permute(0, 2, 3, 1).numpy()
        # variations: prologue of a reference image, resampled visual tokens (null class, no CFG)
        source = arrays["cfg_split_images"][0]
        with torch.no_grad():
            x = torch.from_numpy(source).permute(2, 0, 1)[None].float() / 127.5 - 1
            prologue, visual = model.tokenizer.encode(x)
        arrays["source_prologue"] = prologue.numpy()
        arrays["source_visual"] = visual.numpy()
        tokens = pe.sample(model.ar, [10] * 3, {"cfg": 0.0}, seed=5, prologue_ids=prologue.repeat(3, 1))
        arrays["variations_tokens"] = tokens.numpy()
    np.savez(root / "reference.npz", **arrays)
    # the TensorRT ONNX forms engines are built from (fake engines run them: tests/test_gpu_backends.py)
    import shutil

    from prologue_export.export.tensorrt import prepare_tensorrt

    shutil.rmtree(root / "bundle_trt", ignore_errors=True)
    shutil.copytree(root / "bundle", root / "bundle_trt")
    prepare_tensorrt(root / "bundle_trt", "fp32", log=lambda m: None)
    return root


if __name__ == "__main__":
    print(build(sys.argv[1]))
