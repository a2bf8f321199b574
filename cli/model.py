"""`prologue import-official` and `prologue presets`."""

from __future__ import annotations

import json

def _cmd_import_official(args) -> int:
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


def _cmd_presets(args) -> int:
    import torch

    from ..model import PrologueModel
    from ..config import MODEL_PRESETS, model_preset

    rows = []
    for name in MODEL_PRESETS:
        cfg = model_preset(name)
        with torch.device("meta"):
            model = PrologueModel(cfg)
        tok = model.tokenizer
        enc = sum(p.numel() for n, p in tok.named_parameters() if not n.startswith("decoder."))
        dec = sum(p.numel() for p in tok.decoder.parameters())
        ar = sum(p.numel() for p in model.ar.parameters())
        rows.append({"preset": name, "tokenizer_encoder": enc, "tokenizer_decoder": dec, "ar": ar,
                     "vocab_size": cfg.vocab().vocab_size, "seq_len": cfg.vocab().seq_len})
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
    p.set_defaults(func=_cmd_presets)
