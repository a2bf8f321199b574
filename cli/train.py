"""`prologue train tokenizer|pretokenize|ar`."""

from __future__ import annotations

import json
from pathlib import Path

from .checks import data_argument, input_path, non_negative_int, output_dir, positive_int


def _check_train_args(args) -> None:
    """Inputs exist and --out can be written, checked before torch is loaded."""
    output_dir(args.out)
    if getattr(args, "checkpoint", None):
        input_path(args.checkpoint, "--checkpoint", "dir")
    if getattr(args, "tokens", None):
        input_path(args.tokens, "--tokens", "dir")
    config = getattr(args, "config", None)
    if config and (config.endswith(".json") or "/" in config or Path(config).exists()):  # a file, not a preset
        input_path(config, "--config", "file")


def _cmd_train(args) -> int:
    _check_train_args(args)
    from ..train.configs import ARTrainConfig, TokenizerTrainConfig, ar_train_preset, load_train_config, tokenizer_train_preset

    if args.phase == "pretokenize":
        from ..train.pretokenize import pretokenize

        index = pretokenize(args.checkpoint, args.data, args.out, crops=args.crops, batch_size=args.batch_size,
                            shard_size=args.shard_size, num_workers=args.num_workers, limit=args.limit)
        print(json.dumps({"tokens": str(args.out), "images": index["num_images"], "shards": len(index["shards"])}))
        return 0
    overrides = list(args.overrides)
    if args.no_compile:
        overrides.append("run.compile=false")
    if args.phase == "tokenizer":
        from ..train.tokenizer import train_tokenizer

        cfg = load_train_config(TokenizerTrainConfig, tokenizer_train_preset, args.config, overrides)
        ckpt = train_tokenizer(cfg, args.data, args.out, resume=args.resume)
    else:
        from ..train.ar import train_ar

        cfg = load_train_config(ARTrainConfig, ar_train_preset, args.config, overrides)
        ckpt = train_ar(cfg, args.tokens, args.out, resume=args.resume)
    print(json.dumps({"checkpoint": str(ckpt)}))
    return 0


def add_parsers(sub) -> None:
    train = sub.add_parser("train", help="train a tokenizer (phase 1), pretokenize (phase 2) or train the AR (phase 3)",
                           description="Training phases. Each runs under `accelerate launch` unchanged for several "
                           "processes, GPUs or nodes.")
    phases = train.add_subparsers(dest="phase", required=True, metavar="PHASE")

    def common(p, config_help):
        p.add_argument("--config", required=True, metavar="FILE|PRESET", help=config_help)
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="config overrides with JSON values, e.g. steps=200 optim_tokenizer.lr=3e-4")
        p.add_argument("--out", required=True, metavar="DIR", help="run folder (checkpoint/, metrics.jsonl, images/)")
        p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
        p.add_argument("--no-compile", action="store_true", help="do not torch.compile the models")
        p.set_defaults(func=_cmd_train)

    p = phases.add_parser("tokenizer", help="phase 1: tokenizer + joint AR (variants prologue, 2d, post)")
    common(p, "a JSON training config or a preset: tiny, tiny-2d, tiny-post, prologue-b, 2d (the last two need "
              "perceptual_weights=PATH, or perceptual_weights=none to train without the perceptual loss)")
    p.add_argument("--data", type=data_argument, default="fashion-mnist", metavar="PATH",
                   help="fashion-mnist (default; Debian's dataset-fashion-mnist), synthetic[:N], a folder "
                   "with the Fashion-MNIST IDX files, or ImageNet-style class folders")

    p = phases.add_parser("ar", help="phase 3: the class-conditional AR on pretokenized shards")
    common(p, "a JSON training config or a preset: tiny, base, large, xlarge")
    p.add_argument("--tokens", required=True, metavar="DIR", help="the shard folder written by `prologue train pretokenize`")

    p = phases.add_parser("pretokenize", help="phase 2: encode a data set with the EMA tokenizer into id shards")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a tokenizer checkpoint (phase 1's checkpoint/ folder)")
    p.add_argument("--data", type=data_argument, default="fashion-mnist", metavar="PATH", help="as for `train tokenizer`")
    p.add_argument("--out", required=True, metavar="DIR", help="shard folder (index.json + shard_*.npz); resumable")
    p.add_argument("--crops", choices=["ten", "center"], default="ten", help="ten-crop augmentation (default) or one centre crop")
    p.add_argument("--batch-size", type=positive_int, default=256, help="images per encoder batch")
    p.add_argument("--shard-size", type=positive_int, default=8192, help="images per shard file")
    p.add_argument("--num-workers", type=non_negative_int, default=2, help="image decoding worker processes")
    p.add_argument("--limit", type=positive_int, metavar="N", help="encode only the first N images of the data set")
    p.set_defaults(func=_cmd_train)
