"""`prologue generate|variations|reconstruct`: the torch-free runtime's commands."""

from __future__ import annotations

import json
import sys

from ..runtime.contract import AR_WEIGHTS
from ..runtime.generator import BACKENDS
from ..runtime.loop import MAX_IMAGES_PER_CALL
from .checks import (CLIError, bundle_dir, image_count, input_path, non_negative_int, output_file, positive_int, seed_int,
                     sha256_digest)
from .sampling_args import add_sampling_arguments, sampling_arguments

RUNTIME_COMMANDS = ("generate", "variations", "reconstruct")


def _progress(label: str, enabled: bool):
    """A one-line progress display on stderr (the runtime has no tqdm dependency); where stderr
    is a pipe or a log file, only the finished line."""
    if not enabled:
        return None
    redraw = sys.stderr.isatty()

    def show(done: int, total: int) -> None:
        if not redraw and done < total:
            return
        width = 30
        filled = int(width * done / total)
        end = "\n" if done == total else ""
        print(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} steps", end=end,
              file=sys.stderr, flush=True)

    return show


def _write_grid(images, out: str, nrow) -> None:
    from ..runtime.images import grid, grid_columns, save_png

    save_png(grid(images, grid_columns(len(images), nrow)), out)  # at most one column per image


def _wrote(args, report: dict, what: str, gen) -> None:
    """The one line (or JSON report) of what was written; the path shown with control characters
    escaped (`files.shown`), so a newline in --out cannot split it."""
    from ..runtime.files import shown

    report["bundle_digest"] = gen.bundle.digest
    print(json.dumps(report) if args.json else f"wrote {shown(args.out)} ({what}, {gen.backend_name})")


def _generator(args, **kwargs):
    """The Generator of --bundle, pinned by --digest when given (the bundle is refused otherwise)."""
    from ..runtime.generator import Generator

    return Generator.from_bundle(args.bundle, backend=args.backend, digest=args.digest, **kwargs)


def _check_common(args) -> None:
    """Checks made before a bundle is loaded: --out, --bundle."""
    output_file(args.out)
    bundle_dir(args.bundle)


def _cmd_generate(args) -> int:
    import numpy as np

    if len(args.class_ids) * args.n > MAX_IMAGES_PER_CALL:
        raise CLIError(f"{len(args.class_ids)} classes x --n {args.n} images is more than {MAX_IMAGES_PER_CALL} images")
    _check_common(args)
    sampling, overrides = sampling_arguments(args)
    gen = _generator(args, ar_weights=args.ar_weights)
    settings = gen.settings(sampling, **overrides)
    classes = np.repeat(np.asarray(args.class_ids, dtype=np.int64), args.n)
    images = gen.generate(classes, seed=args.seed, sampling=settings, progress=_progress("generate", not args.json))
    _write_grid(images, args.out, args.nrow or args.n)
    report = {"out": args.out, "images": int(len(images)), "classes": [int(c) for c in classes], "seed": args.seed,
              "backend": gen.backend_name, "settings": vars(settings)}
    _wrote(args, report, f"{len(images)} images", gen)
    return 0


def _cmd_variations(args) -> int:
    from ..runtime.images import load_image

    _check_common(args)
    sampling, overrides = sampling_arguments(args)
    input_path(args.image, "--image", "file")
    gen = _generator(args, ar_weights=args.ar_weights)
    image = load_image(args.image, gen.bundle.image_size, gen.bundle.channels)
    images = gen.variations(image, args.n, seed=args.seed, class_id=args.class_id, sampling=sampling,
                            progress=_progress("variations", not args.json), **overrides)
    _write_grid(images, args.out, args.nrow)
    report = {"out": args.out, "images": int(len(images)), "source": args.image, "seed": args.seed,
              "backend": gen.backend_name}
    _wrote(args, report, f"{len(images)} variations", gen)
    return 0


def _cmd_reconstruct(args) -> int:
    import numpy as np

    from ..runtime.generator import parse_images

    _check_common(args)
    for path in args.image:
        input_path(path, "--image", "file")
    gen = _generator(args)
    images = parse_images(args.image, gen.bundle)
    recon = gen.reconstruct(images)
    pairs = np.concatenate([images, recon])  # first row inputs, second row reconstructions
    _write_grid(pairs, args.out, len(images))
    report = {"out": args.out, "images": int(len(images)), "backend": gen.backend_name}
    _wrote(args, report, "inputs over reconstructions", gen)
    return 0


def add_parsers(sub) -> None:
    def common(p):
        p.add_argument("--bundle", required=True, metavar="DIR", help="a bundle written by `prologue export`")
        p.add_argument("--out", required=True, metavar="PNG", help="output image grid (written atomically)")
        p.add_argument("--backend", default="auto", choices=BACKENDS,
                       help="execution backend (default auto: the best ONNX Runtime provider available)")
        p.add_argument("--json", action="store_true", help="print a JSON report of what was written")
        p.add_argument("--digest", type=sha256_digest, metavar="SHA256",
                       help="refuse the bundle unless its manifest.json has this sha256 (what prologue export and "
                       "build-engines print)")

    def sampling(p):
        p.add_argument("--seed", type=seed_int, default=0, help="noise seed, 0 .. 2**64 - 1 (default 0)")
        add_sampling_arguments(p, "the bundle's sampling defaults")
        p.add_argument("--nrow", type=positive_int, help="images per grid row")
        p.add_argument("--ar-weights", dest="ar_weights", default="fp32", choices=AR_WEIGHTS,
                       help="AR graph: fp32 (default) or a weight-only quantized one the bundle carries")

    p = sub.add_parser("generate", help="generate class-conditional images from a bundle (no torch needed)")
    common(p)
    sampling(p)
    p.add_argument("--class", dest="class_ids", type=non_negative_int, nargs="+", action="extend", required=True,
                   metavar="ID", help="class id(s), --class 1 2 or --class 1 --class 2 (repeats add up); the null class "
                   "id gives unconditional samples")
    p.add_argument("--n", type=image_count, default=8, help=f"images per class (default 8; at most {MAX_IMAGES_PER_CALL} in all)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("variations", help="images that share the prologue of an input image")
    common(p)
    sampling(p)
    p.add_argument("--image", required=True, metavar="FILE", help="input image of the bundle's size")
    p.add_argument("--n", type=image_count, default=8, help=f"number of variations (default 8, at most {MAX_IMAGES_PER_CALL})")
    p.add_argument("--class-id", dest="class_id", type=non_negative_int, help="class to condition on (default: unconditional)")
    p.set_defaults(func=_cmd_variations)

    p = sub.add_parser("reconstruct", help="encode and decode images through the visual tokens")
    common(p)
    p.add_argument("--image", required=True, nargs="+", metavar="FILE", help="input image(s) of the bundle's size")
    p.set_defaults(func=_cmd_reconstruct)
