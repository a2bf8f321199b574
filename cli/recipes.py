"""`prologue demo` and `prologue experiment`: the recipes that span every room."""

from __future__ import annotations

import json
import sys

from .checks import data_argument, input_path, non_negative_int, output_dir, positive_float


def _cmd_demo(args) -> int:
    output_dir(args.out)
    from .demo import run_demo

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
            earlier = "  (done in an earlier run)" if name in report.get("reused", ()) else ""
            print(f"  {name:<20} {secs:>7.1f} s{earlier}")
        print(f"  {'total':<20} {report['total_seconds']:>7.1f} s")
    return 0


def _cmd_experiment(args) -> int:
    output_dir(args.out)
    if args.inception:
        input_path(args.inception, "--inception", "file")
    if args.post_from:
        input_path(args.post_from, "--post-from", "dir")
    from .experiment import ROWS, parse_rows, run_experiment

    rows = parse_rows(args.rows) if args.rows is not None else ROWS
    log = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    results = run_experiment(args.out, scale=args.scale, data=args.data, inception=args.inception,
                             compile_=not args.no_compile, log=log, rows=rows,
                             tokenizer_overrides=args.tokenizer_set or (), post_from=args.post_from)
    print(json.dumps(results, indent=2) if args.json else results["table"])
    return 0


def add_parsers(sub) -> None:
    _add_demo_parser(sub)
    _add_experiment_parser(sub)


def _add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="train a small Prologue, export it and generate pictures with the runtime",
                       description="The whole pipeline at demo scale: phase 1, pretokenize, phase 3, export + verify, "
                       "then class, reconstruction and fixed-prologue grids from the torch-free runtime.")
    p.add_argument("--data", type=data_argument, default="fashion-mnist", metavar="PATH",
                   help="fashion-mnist (default) or a folder of class subfolders (images are resized to 32x32 RGB)")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder (default runs/demo); rerunning continues")
    p.add_argument("--scale", type=positive_float, default=1.0, help="multiplies the training steps (default 1.0)")
    p.add_argument("--pretokenize-limit", dest="pretokenize_limit", type=non_negative_int, default=12000, metavar="N",
                   help="pretokenize (ten-crop) only the first N images (default 12000; 0 = all)")
    p.add_argument("--no-compile", action="store_true", help="do not torch.compile the models")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_demo)


def _add_experiment_parser(sub) -> None:
    p = sub.add_parser("experiment", help="the paper's 2d / prologue / post comparison at small scale",
                       description="Train the 2d baseline (2 seeds), prologue (2 seeds) and post tokenizers with equal "
                       "budgets, each followed by the same AR; report rFID, gFID without and with CFG, IS and the "
                       "linear probe. About an hour on a 2-core CPU at --scale 1; rerunning continues.")
    p.add_argument("name", choices=["small"], help="the experiment (small: Fashion-MNIST, tiny models)")
    p.add_argument("--out", default="runs/experiment-small", metavar="DIR", help="output folder")
    p.add_argument("--scale", type=positive_float, default=1.0, help="multiplies steps, subsets and sample counts")
    p.add_argument("--data", type=data_argument, default="fashion-mnist", metavar="PATH", help="data set (default fashion-mnist)")
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
