"""`prologue export` and `prologue build-engines`."""

from __future__ import annotations

import json
import sys

from ..export.tensorrt import DEFAULT_WORKSPACE_GB, PRECISIONS
from ..runtime.contract import DEFAULT_MAX_BATCH, QUANTIZED_AR_WEIGHTS
from ..runtime.files import shown
from .checks import (CLIError, bundle_dir, input_path, json_argument, output_dir, output_file, positive_float, positive_int,
                     sha256_digest)

DIGEST_HELP = ("refuse the bundle unless its manifest.json has this sha256 (what prologue export and build-engines "
               "print)")


def _cmd_export(args) -> int:
    input_path(args.checkpoint, "--checkpoint", "dir")
    if args.verify and args.out:
        raise CLIError("give --out BUNDLE to export or --verify BUNDLE to verify, not both")
    if args.digest and not args.verify:
        raise CLIError("--digest pins the bundle --verify checks; an export prints the digest of what it writes")
    if args.verify:
        bundle_dir(args.verify, "--verify")
    elif not args.out:
        raise CLIError("--out BUNDLE is required (or --verify BUNDLE to verify an existing bundle)")
    else:
        output_dir(args.out)
    sampling = json_argument(args.sampling, "--sampling")
    from ..export.bundle import export_bundle
    from ..export.verify import verify_bundle

    log = (lambda msg: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.verify:
        report = verify_bundle(args.verify, checkpoint=args.checkpoint, log=log, digest=args.digest)
        print(json.dumps({"bundle": args.verify, "verification": report}, indent=2) if args.json
              else f"{shown(args.verify)}: verified against {shown(args.checkpoint)}")
        return 0
    manifest = export_bundle(args.checkpoint, args.out, max_batch=args.max_batch,
                             force=args.force, verify=not args.no_verify, sampling=sampling, log=log,
                             ar_weights=args.ar_weights or ())
    summary = {"bundle": args.out, "graphs": sorted(manifest["graphs"]), "files": manifest["files"],
               "verified": bool(manifest.get("verification", {}).get("passed")), "digest": manifest.digest}
    if args.tensorrt:
        from ..export.tensorrt import build_engines

        engines = build_engines(args.out, precision=args.engine_precision, log=log, digest=manifest.digest)
        summary.update(engines=dict(engines), digest=engines.digest)
    print(json.dumps(summary, indent=2) if args.json else
          f"wrote {shown(args.out)}: {', '.join(summary['graphs'])} "
          f"({'verified' if summary['verified'] else 'NOT verified'})"
          + (f"; TensorRT engines: {', '.join(summary['engines'])}" if args.tensorrt else "")
          + f"; digest {summary['digest']} (pin it with --digest)")
    return 0


def _cmd_build_engines(args) -> int:
    bundle_dir(args.bundle, "BUNDLE")
    if args.timing_cache:
        output_file(args.timing_cache, "--timing-cache")
    if args.opt_batch is not None and args.max_batch is not None and args.opt_batch > args.max_batch:
        raise CLIError(f"--opt-batch {args.opt_batch} is larger than --max-batch {args.max_batch}")
    from ..export.tensorrt import build_engines, prepare_tensorrt, trtexec_commands

    log = (lambda msg: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.print_trtexec:
        section = prepare_tensorrt(args.bundle, args.precision, max_batch=args.max_batch, opt_batch=args.opt_batch,
                                   log=log, digest=args.digest)
        lines = trtexec_commands(args.bundle, args.precision, args.timing_cache, args.workspace_gb,
                                 digest=section.digest)  # the manifest just written, no other
        print(json.dumps({"commands": lines, "digest": section.digest}, indent=2) if args.json else
              "\n".join(lines + [f"# bundle digest (sha256 of manifest.json): {section.digest}"]))
        return 0
    engines = build_engines(args.bundle, precision=args.precision, max_batch=args.max_batch, opt_batch=args.opt_batch,
                            timing_cache=args.timing_cache, workspace_gb=args.workspace_gb, log=log, digest=args.digest)
    print(json.dumps({"engines": engines, "digest": engines.digest}, indent=2) if args.json else
          "\n".join([f"{g}: {m['file']} ({m['precision']}, TensorRT {m['tensorrt_version']}, {m['device']} "
                     f"cc {m['compute_capability']})" for g, m in engines.items()]
                    + [f"bundle digest (sha256 of manifest.json): {engines.digest}"]))
    return 0


def add_parsers(sub) -> None:
    _add_export_parser(sub)
    _add_build_engines_parser(sub)


def _add_export_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="export a checkpoint to an ONNX bundle (decoder, prologue generator, AR step) and verify it",
        description="Write a bundle folder (manifest.json + ONNX graphs) from a checkpoint, then verify it with ONNX "
        "Runtime against torch: per-graph parity, dynamic axes, and whole generations (same tokens as the torch "
        "sampler for the same seed). With --verify BUNDLE, only verify an existing bundle.")
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="checkpoint folder (training or import-official)")
    p.add_argument("--out", metavar="BUNDLE", help="bundle folder to write (must not exist unless --force)")
    p.add_argument("--verify", metavar="BUNDLE", help="verify this existing bundle against --checkpoint instead of exporting")
    p.add_argument("--max-batch", type=positive_int, default=DEFAULT_MAX_BATCH, metavar="N",
                   help=f"largest batch the graphs and engines must serve (default {DEFAULT_MAX_BATCH})")
    p.add_argument("--sampling", metavar="JSON", help="sampling defaults stored in the manifest, a JSON object, e.g. '{\"cfg\": 3.0}' "
                   "(our names or the release's)")
    p.add_argument("--ar-weights", dest="ar_weights", nargs="+", choices=QUANTIZED_AR_WEIGHTS, metavar="W",
                   help="also write weight-only quantized AR graphs (int8 and/or int4, ONNX Runtime MatMulNBits)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--no-verify", action="store_true", help="skip verification (not recommended)")
    p.add_argument("--tensorrt", action="store_true",
                   help="also build TensorRT engines into the bundle (a GPU host with tensorrt and cuda-python)")
    p.add_argument("--engine-precision", dest="engine_precision", choices=PRECISIONS, default="fp16",
                   help="precision of the TensorRT engines' weight matmuls (default fp16; norms, softmax, logits fp32)")
    p.add_argument("--digest", type=sha256_digest, metavar="SHA256", help=f"with --verify: {DIGEST_HELP}")
    p.add_argument("--json", action="store_true", help="print a JSON summary (with the new bundle's digest)")
    p.set_defaults(func=_cmd_export)


def _add_build_engines_parser(sub) -> None:
    p = sub.add_parser(
        "build-engines", help="build TensorRT engines from a bundle's ONNX graphs (GPU host)",
        description="One strongly typed TensorRT engine per graph, with an optimisation profile (min 1, opt the serving "
        "batch, max --max-batch), a reusable timing cache, and the engine's provenance (TensorRT version, GPU, "
        "precision, profile) written into the manifest. First the ONNX each engine is built from (If nodes inlined, "
        "TopK capped, weight matmuls in --precision) is written into the bundle and checked against TensorRT 10's ONNX "
        "operator table. Needs tensorrt and cuda-python on a CUDA GPU host, except with --print-trtexec.")
    p.add_argument("bundle", metavar="BUNDLE", help="bundle folder written by prologue export")
    p.add_argument("--precision", choices=PRECISIONS, default="fp16",
                   help="weight matmuls in this type; norms, softmax, RoPE, sampling and logits stay fp32 (default fp16)")
    p.add_argument("--max-batch", dest="max_batch", type=positive_int, default=None, metavar="N",
                   help="largest batch (default: the bundle's max_batch)")
    p.add_argument("--opt-batch", dest="opt_batch", type=positive_int, default=None, metavar="N",
                   help="the serving batch the engines are tuned for (default min(8, max batch))")
    p.add_argument("--timing-cache", dest="timing_cache", metavar="FILE",
                   help="TensorRT timing cache to reuse and update (default ~/.cache/prologue-export/)")
    p.add_argument("--workspace-gb", dest="workspace_gb", type=positive_float, default=DEFAULT_WORKSPACE_GB,
                   help=f"builder workspace (default {DEFAULT_WORKSPACE_GB:g})")
    p.add_argument("--print-trtexec", dest="print_trtexec", action="store_true",
                   help="do not build: write and check the ONNX files engines are built from, list them in the manifest's "
                   "tensorrt section and print one trtexec command per graph (no TensorRT needed here)")
    p.add_argument("--digest", type=sha256_digest, metavar="SHA256", help=DIGEST_HELP)
    p.add_argument("--json", action="store_true",
                   help="print the engines' manifest entries (or the trtexec commands) and the new digest as JSON")
    p.set_defaults(func=_cmd_build_engines)
