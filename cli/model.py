"""`prologue import-official` and `prologue presets`."""

from __future__ import annotations

import json
import sys

from .checks import CLIError, input_path, output_dir


HUB_ONLY = ("revision", "cache_dir", "offline", "tokenizer_only")


def _check_import_args(args) -> None:
    """One way per source: --hub with --preset, or local folders with --tokenizer [--ar]."""
    if args.hub is not None:
        if args.ar:
            raise CLIError("--hub fetches the folders itself; drop --ar (or drop --hub to import local folders)")
        if not args.preset:
            raise CLIError("--hub needs --preset NAME (the released pair, e.g. prologue-b-b)")
        from .hub import DEFAULT_REPO, check_repo_id, check_revision

        check_repo_id(args.hub or DEFAULT_REPO)  # huggingface_hub's own rules, before any work
        check_revision(args.revision)  # a commit, branch, tag or refs/pr/N: never a path
    else:
        given = [f"--{name.replace('_', '-')}" for name in HUB_ONLY if getattr(args, name) not in (None, False)]
        if given:
            raise CLIError(f"{', '.join(given)} only apply with --hub")
        input_path(args.tokenizer, "--tokenizer", "dir")
        if args.ar:
            input_path(args.ar, "--ar", "dir")
    if args.official_config:
        input_path(args.official_config, "--official-config", "file")
    output_dir(args.out)


def _official_config(args):
    """--official-config read strictly (bounded, no NaN, UTF-8, an object) and checked field by field
    before anything is fetched or read; None without it."""
    if not args.official_config:
        return None
    from ..official import config_from_official, read_official_config

    data = read_official_config(args.official_config)
    with_ar = not args.tokenizer_only if args.hub is not None else bool(args.ar or args.onestage)
    config_from_official(data, with_ar=with_ar)
    return data


def _import(args):
    official_config = _official_config(args)
    if args.hub is not None:
        from .hub import DEFAULT_REPO, import_from_hub, resolve_release

        release = resolve_release(args.preset, onestage=args.onestage, tokenizer_only=args.tokenizer_only)
        log = (lambda line: print(line, file=sys.stderr)) if args.json else print
        # --preset names the pair to fetch; its sizes are used unless --official-config gives them
        preset = None if args.official_config else args.preset
        return import_from_hub(args.out, release, official_config=official_config, preset=preset,
                               repo=args.hub or DEFAULT_REPO, revision=args.revision, cache_dir=args.cache_dir,
                               offline=args.offline, log=log)
    from ..official import import_official

    return import_official(args.tokenizer, args.out, ar_dir=args.ar, official_config=official_config,
                           preset=args.preset, onestage=args.onestage)


def _cmd_import_official(args) -> int:
    _check_import_args(args)
    model = _import(args)
    from ..checkpoint import load_source

    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in model.components().items()}
    report = {"checkpoint": str(args.out), "parameters": counts, "config": model.config.to_dict(),
              "source": load_source(args.out)}
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
        help="convert the authors' released checkpoints (from the Hub, or local folders) into a prologue-export checkpoint",
        description="Convert the release (hub repo Zyriix/prologue) into a checkpoint folder (config.json + "
        "safetensors). Reads the tokenizer's EMA encoder (model_2) and EMA decoder (model_3) and the AR's "
        "non-EMA weights (model.safetensors), as the authors' evaluation does; never a pickle. "
        "Either --hub [REPO] --preset NAME (downloads only those files through huggingface_hub, "
        "extra `hub`), or local folders with --tokenizer DIR [--ar DIR]. Sizes not visible in tensor "
        "shapes come from --official-config or --preset. config.json records where the weights came "
        "from (repo, commit, files, sha256).",
    )
    # const "": hub.DEFAULT_REPO (not imported here: it would load torch for `prologue --help`)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--hub", nargs="?", const="", metavar="REPO",
                   help="fetch the release from the Hugging Face Hub (REPO defaults to Zyriix/prologue); "
                   "needs --preset; uses huggingface_hub's cache, token (HF_TOKEN / `hf auth login`) and progress bars")
    p.add_argument("--revision", metavar="REV", help="with --hub: a commit hash, a branch or tag name, or refs/pr/N (default main)")
    p.add_argument("--cache-dir", metavar="DIR", help="with --hub: the Hugging Face cache folder (default HF_HUB_CACHE)")
    p.add_argument("--offline", action="store_true",
                   help="with --hub: read the cache only, never the network (as HF_HUB_OFFLINE=1)")
    p.add_argument("--tokenizer-only", action="store_true",
                   help="with --hub: only the preset's tokenizer folder (no AR)")
    source.add_argument("--tokenizer", metavar="DIR", help="released tokenizer folder, e.g. prologue-b-tokenizer/ (without --hub)")
    p.add_argument("--ar", metavar="DIR", help="released AR folder, e.g. ar-prologue-b-b/ (without --hub; omit for a tokenizer-only checkpoint)")
    p.add_argument("--out", required=True, metavar="CKPT", help="checkpoint folder to write (replaced atomically if it is a checkpoint)")
    p.add_argument("--official-config", metavar="FILE", help="the resolved official config as JSON (like fixture_a/config.json)")
    p.add_argument("--preset", metavar="NAME", help="a model preset, e.g. prologue-b-b, prologue-l-xl, prologue-post-b, 2d-base, "
                   "or TOKENIZER+AR (with --hub: the released pair to fetch, whose sizes are used unless --official-config is given)")
    p.add_argument("--onestage", action="store_true",
                   help="the prologue-onestage-joint folder: non-EMA tokenizer (model, model_1) and its AR (model_5), "
                   "as the paper's OneStage row; no --ar (with --hub: --preset prologue-b-b)")
    p.add_argument("--json", action="store_true", help="print a JSON report (progress goes to stderr)")
    p.set_defaults(func=_cmd_import_official)

    p = sub.add_parser("presets", help="list the model presets with their parameter counts")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--count", action="store_true", help="count the parameters on the model itself (loads torch)")
    p.set_defaults(func=_cmd_presets)
