"""Training phases 1-3 (`prologue train tokenizer|pretokenize|ar`); nothing but the CLI imports this."""

from __future__ import annotations


def run_cli(args) -> int:
    import json

    from .configs import ARTrainConfig, TokenizerTrainConfig, ar_train_preset, load_train_config, tokenizer_train_preset

    if args.phase == "pretokenize":
        from .pretokenize import pretokenize

        index = pretokenize(args.checkpoint, args.data, args.out, crops=args.crops, batch_size=args.batch_size,
                            shard_size=args.shard_size, num_workers=args.num_workers, limit=args.limit)
        print(json.dumps({"tokens": str(args.out), "images": index["num_images"], "shards": len(index["shards"])}))
        return 0
    overrides = list(args.overrides)
    if args.no_compile:
        overrides.append("run.compile=false")
    if args.phase == "tokenizer":
        from .tokenizer import train_tokenizer

        cfg = load_train_config(TokenizerTrainConfig, tokenizer_train_preset, args.config, overrides)
        ckpt = train_tokenizer(cfg, args.data, args.out, resume=args.resume)
    else:
        from .ar import train_ar

        cfg = load_train_config(ARTrainConfig, ar_train_preset, args.config, overrides)
        ckpt = train_ar(cfg, args.tokens, args.out, resume=args.resume)
    print(json.dumps({"checkpoint": str(ckpt)}))
    return 0
