"""`prologue import-official` and `prologue presets`."""

from __future__ import annotations

import json

from .checks import input_path, output_dir


def _cmd_import_official(args) -> int:
    input_path(args.tokenizer, "--tokenizer", "dir")
    if args.ar:
        input_path(args.ar, "--ar", "dir")
    if args.official_config:
        input_path(args.official_config, "--official-config", "file")
    output_dir(args.out)
    from ..official import import_official

    model = import_official(
        args.tokenizer, args.out, ar_dir=args.ar, official_config=args.official_config, preset=args.preset,
        onestage=args.onestage,
    )
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in model.components().items()}
    report = {"checkpoint": str(args.out), "parameters": counts, "config": model.config.to_dict()}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"wrote {args.out}")
        for name, n in counts.items():
            print(f"  {name}: {n:,} parameters")
    return 0


# preset -> parameters of (tokenizer encoder incl. quantizers, tokenizer decoder, AR): what
# `parameter_counts` computes from the model definition (tests/test_cli.py checks every row), kept
# here so that `prologue presets` answers without loading torch; `--count` recomputes them.
PRESET_PARAMETERS = {
    "prologue-b-b": (87_120_508, 86_879_840, 115_470_176),
    "prologue-b-l": (87_120_508, 86_879_840, 348_223_840),
    "prologue-b-xl": (87_120_508, 86_879_840, 693_504_352),
    "prologue-l-b": (86_948_476, 306_310_256, 96_595_808),
    "prologue-l-l": (86_948_476, 306_310_256, 323_058_016),
    "prologue-l-xl": (86_948_476, 306_310_256, 662_047_072),
    "prologue-post-b": (120_366_812, 86_879_840, 115_470_176),
    "2d-base": (87_083_118, 86_879_840, 113_895_776),
    "tiny": (124_712, 120_924, 161_440),
    "tiny-2d": (122_394, 120_924, 153_120),
    "tiny-post": (247_624, 120_924, 161_440),
}


def parameter_counts(name: str) -> tuple:
    """(encoder, decoder, AR) parameters of a model preset, counted on the model itself (meta device)."""
    import torch

    from ..config import model_preset
    from ..model import PrologueModel

    with torch.device("meta"):
        model = PrologueModel(model_preset(name))
    tok = model.tokenizer
    encoder = sum(p.numel() for n, p in tok.named_parameters() if not n.startswith("decoder."))
    return encoder, sum(p.numel() for p in tok.decoder.parameters()), sum(p.numel() for p in model.ar.parameters())


def _cmd_presets(args) -> int:
    from ..config import MODEL_PRESETS, model_preset

    rows = []
    for name in MODEL_PRESETS:
        vocab = model_preset(name).vocab()
        enc, dec, ar = parameter_counts(name) if args.count else PRESET_PARAMETERS[name]
        rows.append({"preset": name, "tokenizer_encoder": enc, "tokenizer_decoder": dec, "ar": ar,
                     "vocab_size": vocab.vocab_size, "seq_len": vocab.seq_len})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'preset':<18}{'encoder':>14}{'decoder':>14}{'AR':>14}{'V':>8}{'T':>6}")
        for r in rows:
            print(f"{r['preset']:<18}{r['tokenizer_encoder']:>14,}{r['tokenizer_decoder']:>14,}{r['ar']:>14,}"
                  f"{r['vocab_size']:>8}{r['seq_len']:>6}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "import-official",
        help="convert the authors' released checkpoint folders into a prologue-export checkpoint",
        description="Convert released accelerate folders (hub repo Zyriix/prologue) into a checkpoint "
        "folder (config.json + safetensors). Reads the tokenizer's EMA encoder (model_2) and EMA "
        "decoder (model_3) and the AR's non-EMA weights (model.safetensors), as the authors' "
        "evaluation does. Sizes not visible in tensor shapes come from --official-config or --preset.",
    )
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="released tokenizer folder, e.g. prologue-b-tokenizer/")
    p.add_argument("--ar", metavar="DIR", help="released AR folder, e.g. ar-prologue-b-b/ (omit for a tokenizer-only checkpoint)")
    p.add_argument("--out", required=True, metavar="CKPT", help="checkpoint folder to write (replaced atomically if it is a checkpoint)")
    p.add_argument("--official-config", metavar="FILE", help="the resolved official config as JSON (like fixture_a/config.json)")
    p.add_argument("--preset", metavar="NAME", help="a model preset, e.g. prologue-b-b, prologue-l-xl, prologue-post-b, 2d-base, or TOKENIZER+AR")
    p.add_argument("--onestage", action="store_true",
                   help="the prologue-onestage-joint folder: non-EMA tokenizer (model, model_1) and its AR (model_5), "
                   "as the paper's OneStage row; no --ar")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.set_defaults(func=_cmd_import_official)

    p = sub.add_parser("presets", help="list the model presets with their parameter counts")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--count", action="store_true", help="count the parameters on the model itself (loads torch)")
    p.set_defaults(func=_cmd_presets)
