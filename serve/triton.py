"""A bundle as a Triton Inference Server model: the model repository `prologue triton` writes, and
the Python-backend model that runs in it (docs/triton.md).

The repository is `REPO/<name>/config.pbtxt` (typed inputs and outputs, `dynamic_batching`,
`instance_group`, and our parameters: the runtime backend, the bundle and its digest) and
`REPO/<name>/1/model.py`, a copy of `triton_entry.py`, which imports `TritonModel` from here. The
bundle is copied into `REPO/<name>/1/bundle` (from verified bytes) or referenced by its absolute
path; either way its manifest's sha256 is pinned in the config and every file is checked when the
model loads, so a bundle that fails its checks makes the model fail to load, with the reason in the
server's log.

One row of a request is one image: `Generator.generate([class_id], seed, settings)[0]` for the
row's own seed and settings (with `prologue_ids`, those prologue tokens fixed, as
`Generator.sample_tokens(..., prologue_ids=...)`). Triton's dynamic batcher hands `execute` several
requests at once; they run through `Batcher.run`, the same per-request-noise batching as `prologue
serve` (each row draws from its own `PCG64(seed)` stream, rows with equal settings share an AR loop),
so batching never changes an image. Torch-free: numpy and the runtime; `triton_python_backend_utils`
is handed in by the entry file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import typing
from pathlib import Path

import numpy as np

from ..runtime.bundle import MANIFEST, Bundle, BundleError
from ..runtime.errors import PrologueError, one_line
from ..runtime.files import _umask, check_output_path, fsync_dir, publish_folder, temp_folder, write_text_atomic
from ..runtime.loop import MAX_SEED, InputError, check_class_ids, check_prologue_ids, check_seed
from ..runtime.settings import SAMPLING_OPTIONS, ConfigError
from .batch import Batcher, Job

MODEL_NAME = "prologue"
VERSION = "1"
BUNDLE_FOLDER = "bundle"  # the bundle's copy, inside the version folder
ENTRY_FILE = Path(__file__).with_name("triton_entry.py")  # written as <name>/1/model.py
KINDS = ("cpu", "gpu")
MARKER = "# prologue-export model repository"  # the first line of each config.pbtxt we write
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
DEFAULT_QUEUE_DELAY_US = 10_000  # as `prologue serve --batch-window-ms 10`
MAX_QUEUE_DELAY_US = 10_000_000
MAX_INSTANCES = 64


class TritonError(PrologueError, ValueError):
    """A model repository that cannot be written as asked."""


# ---------------------------------------------------------------------------------------------
# the model's inputs and outputs


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One input or output of the Triton model (dims without the batch dimension)."""

    name: str
    data_type: str  # Triton's TYPE_* name
    dims: typing.Tuple[int, ...]
    optional: bool = False

    @property
    def dtype(self):
        return {"TYPE_INT64": np.int64, "TYPE_UINT64": np.uint64, "TYPE_FP64": np.float64, "TYPE_UINT8": np.uint8,
                "TYPE_STRING": np.object_}[self.data_type]


OPTION_TYPES = {float: "TYPE_FP64", int: "TYPE_INT64", str: "TYPE_STRING"}  # FP64: a Python float, exactly


def inputs(bundle: Bundle) -> typing.List[Tensor]:
    """class_id (the null class allowed) and seed (absent: a random one, sent back), one input per
    sampling option of the settings table (all optional: the bundle's default when absent), and
    the raw prologue codes to keep fixed (bundles with a prologue). docs/triton.md has the table."""
    out = [Tensor("class_id", "TYPE_INT64", (1,)), Tensor("seed", "TYPE_UINT64", (1,), optional=True)]
    out += [Tensor(o.name, OPTION_TYPES[o.type], (1,), optional=True) for o in SAMPLING_OPTIONS]
    if bundle.vocab.has_prologue:
        out.append(Tensor("prologue_ids", "TYPE_INT64", (bundle.vocab.num_prologue_tokens,), optional=True))
    return out


def outputs(bundle: Bundle) -> typing.List[Tensor]:
    """The image (HWC), the seed each row used, and its prologue codes (bundles with a prologue)."""
    out = [Tensor("image", "TYPE_UINT8", (bundle.image_size, bundle.image_size, bundle.channels)),
           Tensor("seed", "TYPE_UINT64", (1,))]
    if bundle.vocab.has_prologue:
        out.append(Tensor("prologue_ids", "TYPE_INT64", (bundle.vocab.num_prologue_tokens,)))
    return out


# ---------------------------------------------------------------------------------------------
# the repository


@dataclasses.dataclass
class RepositoryOptions:
    """What `prologue triton` writes into config.pbtxt (docs/triton.md)."""

    name: str = MODEL_NAME
    backend: str = "auto"  # the runtime's backend (runtime.generator.BACKENDS)
    kind: str = "cpu"  # instance_group kind: cpu or gpu
    instances: int = 1  # model instances per device (each its own Python process and model)
    gpus: typing.Tuple[int, ...] = ()  # kind gpu: which GPUs (empty: all of them)
    max_batch_size: typing.Optional[int] = None  # rows per execute (default: the bundle's max batch)
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US  # the dynamic batcher's max_queue_delay_microseconds
    dynamic_batching: bool = True
    threads: typing.Optional[int] = None  # ONNX Runtime intra-op threads per instance
    ar_weights: str = "fp32"
    reference: bool = False  # reference the bundle by its absolute path instead of copying it
    site_packages: typing.Tuple[str, ...] = ()  # folders the model's Python adds to sys.path first

    def validate(self) -> "RepositoryOptions":
        from ..runtime.contract import AR_WEIGHTS
        from ..runtime.generator import BACKENDS

        if not isinstance(self.name, str) or not NAME.fullmatch(self.name):
            raise TritonError(f"the model name must be 1-64 letters, digits, _ . - (not starting with . or -), "
                              f"got {self.name!r}")
        checks = [(self.backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}"),
                  (self.kind in KINDS, f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}"),
                  (_int_in(self.instances, 1, MAX_INSTANCES), f"instances must be in [1, {MAX_INSTANCES}]"),
                  (self.max_batch_size is None or _int_in(self.max_batch_size, 1, 1024),
                   "max_batch_size must be in [1, 1024]"),
                  (_int_in(self.queue_delay_us, 0, MAX_QUEUE_DELAY_US),
                   f"queue_delay_us must be in [0, {MAX_QUEUE_DELAY_US}]"),
                  (self.threads is None or _int_in(self.threads, 1, 1024), "threads must be in [1, 1024]"),
                  (self.ar_weights in AR_WEIGHTS, f"ar_weights must be one of {', '.join(AR_WEIGHTS)}"),
                  (all(_int_in(g, 0, 1023) for g in self.gpus) and len(set(self.gpus)) == len(self.gpus),
                   "gpus must be distinct GPU indices"),
                  (not self.gpus or self.kind == "gpu", "gpus need kind gpu")]
        for ok, message in checks:
            if not ok:
                raise TritonError(message)
        if self.kind == "gpu" and self.backend in ("cpu",):
            raise TritonError("kind gpu with backend cpu would hold a GPU and compute on the CPU: use backend "
                              "cuda or tensorrt (or kind cpu)")
        for folder in self.site_packages:
            if not Path(folder).is_absolute() or os.pathsep in folder or not Path(folder).is_dir():
                raise TritonError(f"site-packages folder {folder!r} must be an existing absolute folder path")
        return self


def _int_in(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _quoted(text: str) -> str:
    return json.dumps(text)  # protobuf text format takes C-style escapes; json's are a subset of them


def config_pbtxt(bundle: Bundle, options: RepositoryOptions, bundle_ref: str) -> str:
    """The model's config.pbtxt (protobuf text format; Triton's model_config.proto)."""
    max_batch = options.max_batch_size or max(1, int(bundle.max_batch))

    def tensors(items):
        lines = []
        for t in items:
            optional = " optional: true" if t.optional else ""
            lines.append(f"  {{ name: {_quoted(t.name)} data_type: {t.data_type} "
                         f"dims: [ {', '.join(map(str, t.dims))} ]{optional} }}")
        return ",\n".join(lines)

    params = {"prologue_backend": options.backend, "bundle": bundle_ref, "bundle_sha256": bundle.digest,
              "ar_weights": options.ar_weights}
    if options.threads:
        params["threads"] = str(options.threads)
    if options.site_packages:
        params["site_packages"] = os.pathsep.join(options.site_packages)
    kind = "KIND_GPU" if options.kind == "gpu" else "KIND_CPU"
    gpus = f" gpus: [ {', '.join(map(str, options.gpus))} ]" if options.gpus else ""
    text = [MARKER + f" (bundle sha256 {bundle.digest})",
            f"name: {_quoted(options.name)}",
            'backend: "python"',
            f"max_batch_size: {max_batch}",
            "input [\n" + tensors(inputs(bundle)) + "\n]",
            "output [\n" + tensors(outputs(bundle)) + "\n]",
            f"instance_group [ {{ count: {options.instances} kind: {kind}{gpus} }} ]"]
    if options.dynamic_batching:
        text.append(f"dynamic_batching {{ max_queue_delay_microseconds: {options.queue_delay_us} }}")
    text += [f"parameters {{ key: {_quoted(k)} value: {{ string_value: {_quoted(v)} }} }}" for k, v in params.items()]
    return "\n".join(text) + "\n"


def _is_our_repository(folder: Path) -> bool:
    """A folder `write_repository` wrote and nobody added to: model folders only, each holding just
    its config.pbtxt (starting with MARKER) and version folder (model.py, the bundle copy whose files
    its manifest all lists, Python's __pycache__)."""
    try:
        models = list(folder.iterdir())
        return bool(models) and all(_is_our_model(m) for m in models)
    except (OSError, BundleError):
        return False


def _is_our_model(model: Path) -> bool:
    if model.is_symlink() or not model.is_dir() or {p.name for p in model.iterdir()} != {"config.pbtxt", VERSION}:
        return False
    if not (model / "config.pbtxt").read_text(errors="replace").startswith(MARKER):
        return False
    version = model / VERSION
    names = {p.name for p in version.iterdir()} if version.is_dir() and not version.is_symlink() else {"?"}
    if not names <= {"model.py", BUNDLE_FOLDER, "__pycache__"} or "model.py" not in names:
        return False
    if BUNDLE_FOLDER in names:
        copy = Bundle(version / BUNDLE_FOLDER, check_hashes=False)
        if copy._scan() - set(copy.files) - {MANIFEST}:
            return False
    return True


def _check_apart(bundle: Bundle, out: Path) -> None:
    """The repository and the bundle must not hold each other: a repository inside the bundle adds
    files its manifest does not vouch for, and a bundle inside the repository being replaced would
    be deleted with it."""
    b, o = bundle.path.resolve(), out.resolve()
    if b == o or b in o.parents or o in b.parents:
        raise TritonError(f"--out {out} and the bundle {bundle.path} must not be inside one another; write the "
                          "repository elsewhere (or copy the bundle out first)")


def write_repository(bundle_path, out, options: typing.Optional[RepositoryOptions] = None,
                     digest: typing.Optional[str] = None, force: bool = False, progress=None) -> Path:
    """Write the Triton model repository `out` for the bundle at `bundle_path` (checked, every file,
    and pinned by `digest` if given), all or nothing: built in a temporary folder beside `out` and
    renamed into place. An existing `out` is replaced only with `force` and only when it is a
    repository this wrote. `progress(name)` is called before each copied file."""
    options = (options or RepositoryOptions()).validate()
    bundle = Bundle(bundle_path, digest=digest)
    out = check_output_path(out, "model repository", folder=True)
    _check_apart(bundle, out)
    if os.path.lexists(out) and not _empty_folder(out):
        if not force:
            raise TritonError(f"{out} exists; pass --force to replace a model repository written by prologue triton")
        if not _is_our_repository(out):
            raise TritonError(f"{out} is not a model repository written by prologue triton; not replacing it")
    tmp = temp_folder(out, "model repository")
    try:
        version = tmp / options.name / VERSION
        version.mkdir(parents=True)
        if options.reference:
            ref = str(bundle.path.resolve())
        else:
            _copy_bundle(bundle, version / BUNDLE_FOLDER, progress)
            ref = BUNDLE_FOLDER
        shutil.copyfile(ENTRY_FILE, version / "model.py")
        write_text_atomic(tmp / options.name / "config.pbtxt", config_pbtxt(bundle, options, ref), "config.pbtxt")
        tmp.chmod(0o777 & ~_umask())  # mkdtemp made it owner-only; a repository is read by the server's user
        for folder in (version, tmp / options.name):  # publish_folder fsyncs tmp itself
            fsync_dir(folder)
        publish_folder(tmp, out, "model repository", check=lambda dest: None if not os.path.lexists(dest)
                       or _empty_folder(dest) or _is_our_repository(dest) else _refuse(dest))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _empty_folder(path: Path) -> bool:
    try:
        return path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    except OSError:
        return False


def _refuse(dest: Path) -> typing.NoReturn:
    raise TritonError(f"{dest} changed meanwhile and is not a model repository written by prologue triton")


def _copy_bundle(bundle: Bundle, dest: Path, progress=None) -> None:
    """The manifest and every file it lists, from bytes checked against it as they are read."""
    manifest = bundle._read_manifest(bundle.path / MANIFEST)
    if hashlib.sha256(manifest).hexdigest() != bundle.digest:
        raise BundleError(f"{bundle.path / MANIFEST} changed while the repository was written; try again")
    dest.mkdir()
    for name in sorted(bundle.files):
        if progress is not None:
            progress(name)
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "xb") as sink:
            bundle.copy_verified(name, sink)
            sink.flush()
            os.fsync(sink.fileno())
    (dest / MANIFEST).write_bytes(manifest)
    for folder in sorted({p.parent for p in dest.rglob("*")} | {dest}, key=lambda p: -len(p.parts)):
        fsync_dir(folder)


# ---------------------------------------------------------------------------------------------
# the model (runs in Triton's Python backend)


def gpu_visible(device_id: int, environ: typing.MutableMapping[str, str], maps: str) -> None:
    """Make Triton's GPU `device_id` this process's only (device 0) GPU, as the runtime's backends
    use device 0: `CUDA_VISIBLE_DEVICES`, which CUDA reads once, when it starts. `maps`: the process's
    /proc/self/maps; where the CUDA driver is already loaded it may be too late, and a GPU other than
    0 is refused rather than silently shared."""
    visible = [d.strip() for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if visible and not 0 <= device_id < len(visible):
        raise BundleError(f"Triton gave this instance GPU {device_id}, but CUDA_VISIBLE_DEVICES lists {len(visible)}")
    if "libcuda.so" in maps and device_id != 0:
        raise BundleError(f"CUDA started in this process before the model could pick Triton's GPU {device_id}; "
                          "run one GPU per Triton server (CUDA_VISIBLE_DEVICES) or instance_group on GPU 0")
    environ["CUDA_VISIBLE_DEVICES"] = visible[device_id] if visible else str(device_id)


def check_stub_numpy(params: typing.Dict[str, str]) -> None:
    """Refuse NumPy 2 in the model's Python unless the config says the stub handles it
    (`allow_numpy2: "true"`). The Python backend's stub passes arrays through pybind11's NumPy API;
    the stubs of nvidia-pytriton 0.7.0 (python_backend r24.10, Triton 2.51) predate NumPy 2, and with
    NumPy 2 every output tensor reaches the client with its shape and no data (HTTP
    `binary_data_size: 0`) and a string (BYTES) input is read as garbage until the stub aborts
    (measured here, tests/test_triton.py). Inside the stub a tensor's round trip still looks fine,
    so no probe can tell: the version decides."""
    if int(np.__version__.split(".")[0]) >= 2 and params.get("allow_numpy2", "").lower() != "true":
        raise BundleError(f"the model's Python has NumPy {np.__version__}; Triton's Python backend stubs of r24.10 "
                          "(nvidia-pytriton 0.7.0) pass arrays through the NumPy 1 API, and with NumPy 2 outputs "
                          "arrive empty: run the model with numpy<2 (docs/triton.md), or set the parameter "
                          "allow_numpy2 to \"true\" for a stub built for NumPy 2")


def _parameters(config: dict) -> typing.Dict[str, str]:
    return {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}


class RequestMetrics:
    """Our counters on Triton's /metrics (the Python backend's custom metrics): Triton's own
    nv_inference_request_success counts a request answered with an error response as a success
    (measured with Triton 2.51), so these say how many were answered with images and how many
    with an error, and how many images went out."""

    OUTCOMES = ("ok", "invalid", "error")  # images; a bad request (InputError); anything else

    def __init__(self, pb_utils, model: str, version: str):
        self.requests: typing.Dict[str, typing.Any] = {}
        self.images = None
        family = getattr(pb_utils, "MetricFamily", None)  # python_backend >= r23.05
        self.families = []
        if family is None:
            return
        requests = family(name="prologue_requests_total", description="requests answered by the prologue model, "
                          "by outcome (ok: images; invalid: a bad request; error: the model failed)",
                          kind=family.COUNTER)
        images = family(name="prologue_images_total", description="images the prologue model sent", kind=family.COUNTER)
        self.families = [requests, images]
        labels = {"model": model, "version": version}
        self.requests = {o: requests.Metric(labels={**labels, "outcome": o}) for o in self.OUTCOMES}
        self.images = images.Metric(labels=labels)

    def count(self, outcome: str, images: int = 0) -> None:
        if outcome in self.requests:
            self.requests[outcome].increment(1)
        if images and self.images is not None:
            self.images.increment(images)

    def close(self) -> None:
        self.requests, self.images = {}, None  # the metrics before their families (the stub's rule)
        self.families = []


class TritonModel:
    """What the repository's model.py runs: `initialize` -> `TritonModel(args, pb_utils)`,
    `execute(requests)`, `finalize()` (the Python backend's model interface)."""

    def __init__(self, args: dict, pb_utils):
        from ..runtime.generator import Generator

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = _parameters(config)
        check_stub_numpy(params)
        model_dir = Path(args["model_repository"])
        ref = Path(params.get("bundle", BUNDLE_FOLDER))
        path = ref if ref.is_absolute() else model_dir / str(args.get("model_version", VERSION)) / ref
        if args.get("model_instance_kind") == "GPU":
            gpu_visible(int(args.get("model_instance_device_id", 0)), os.environ, _maps())
        threads = int(params["threads"]) if params.get("threads") else None
        self.generator = Generator.from_bundle(path, backend=params.get("prologue_backend", "auto"), threads=threads,
                                               ar_weights=params.get("ar_weights", "fp32"),
                                               digest=params.get("bundle_sha256") or None)
        bundle = self.generator.bundle
        self.inputs, self.outputs = inputs(bundle), outputs(bundle)
        self.specs = {t.name: t for t in self.inputs}
        self.batcher = Batcher(self.generator, batching=True, start=False)
        self.metrics = RequestMetrics(pb_utils, str(config.get("name", MODEL_NAME)), str(args.get("model_version", "1")))
        print(f"[prologue] {config.get('name', MODEL_NAME)}: bundle {bundle.path} (sha256 {bundle.digest}), "
              f"{self.generator.backend_name}, max batch {self.generator.max_batch}, numpy {np.__version__}", file=sys.stderr, flush=True)

    def execute(self, requests) -> list:
        """One response per request, in order: its images, or one Triton error with a one-line message
        (a bad request fails alone; the others in the batch are answered)."""
        parsed, jobs = [], []
        for request in requests:
            try:
                rows = request_jobs(self.generator, self._arrays(request), self.specs)
            except (InputError, ConfigError, BundleError) as exc:
                parsed.append(exc)
                continue
            parsed.append(rows)
            jobs += rows
        if jobs:
            self.batcher.run(jobs)
        return [self._response(item) for item in parsed]

    def finalize(self) -> None:
        self.metrics.close()
        self.generator.close()

    def _arrays(self, request) -> typing.Dict[str, np.ndarray]:
        arrays = {}
        for spec in self.inputs:
            tensor = self.pb.get_input_tensor_by_name(request, spec.name)
            if tensor is not None:
                arrays[spec.name] = tensor.as_numpy()
        return arrays

    def _response(self, item):
        if isinstance(item, BaseException):
            return self._error(item)
        failed = next((job.future.exception() for job in item if job.future.exception() is not None), None)
        if failed is not None:
            return self._error(failed)
        results = [job.future.result() for job in item]
        images = np.concatenate([r.images for r in results])
        tokens = np.concatenate([r.tokens for r in results])
        self.metrics.count("ok", len(images))
        values = {"image": images, "seed": np.array([[job.seed] for job in item], dtype=np.uint64)}
        if self.generator.bundle.vocab.has_prologue:
            values["prologue_ids"] = self.generator.prologue_of(tokens).astype(np.int64)
        return self.pb.InferenceResponse(output_tensors=[self._tensor(t.name, values[t.name]) for t in self.outputs])

    def _tensor(self, name: str, array: np.ndarray):
        return self.pb.Tensor(name, np.ascontiguousarray(array))

    def _error(self, exc: BaseException):
        bad_input = isinstance(exc, (InputError, ConfigError))
        self.metrics.count("invalid" if bad_input else "error")
        if bad_input:
            message = one_line(exc)
        else:
            message = f"internal error ({type(exc).__name__}: {one_line(exc, 300)})"
            print(f"[prologue] {message}", file=sys.stderr, flush=True)
        error = self.pb.TritonError
        code = getattr(error, "INVALID_ARG" if bad_input else "INTERNAL", None)
        return self.pb.InferenceResponse(error=error(message) if code is None else error(message, code))


def _maps() -> str:
    try:
        return Path("/proc/self/maps").read_text(errors="replace")
    except OSError:
        return ""


def request_jobs(generator, arrays: typing.Dict[str, np.ndarray],
                 specs: typing.Optional[typing.Dict[str, Tensor]] = None) -> typing.List[Job]:
    """One batcher job per row of a request (`arrays`: input name -> its `[B, *dims]` array as Triton
    hands it over). Every row is checked before any runs; a bad row fails the whole request with a
    message naming the row and the input."""
    bundle = generator.bundle
    specs = specs or {t.name: t for t in inputs(bundle)}  # the model passes its own, made once
    if "class_id" not in arrays:
        raise InputError("class_id is required")
    rows = len(arrays["class_id"]) if np.ndim(arrays["class_id"]) else 0
    for name, array in arrays.items():
        spec = specs.get(name)
        if spec is None:
            raise InputError(f"unknown input {name!r}")
        if np.shape(array) != (rows, *spec.dims) or rows == 0:
            raise InputError(f"{name} must have shape [{', '.join(map(str, ('batch', *spec.dims)))}] "
                             f"(batch >= 1, the same for every input), got {list(np.shape(array))}")
        if np.asarray(array).dtype != np.dtype(spec.dtype):
            raise InputError(f"{name} must be {spec.data_type[5:]}, got {np.asarray(array).dtype}")
    jobs = []
    for row in range(rows):
        try:
            jobs.append(_row_job(generator, arrays, row))
        except (InputError, ConfigError) as exc:
            raise InputError(f"row {row}: {exc}" if rows > 1 else str(exc)) from None
    return jobs


def _row_job(generator, arrays: typing.Dict[str, np.ndarray], row: int) -> Job:
    bundle = generator.bundle
    classes = check_class_ids([int(arrays["class_id"][row, 0])], bundle.num_classes)
    overrides = {}
    for option in SAMPLING_OPTIONS:
        if option.name in arrays:
            value = arrays[option.name][row, 0]
            if option.type is str:
                value = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            overrides[option.name] = option.type(value)
    settings = generator.settings(**overrides)
    seed = (check_seed(int(arrays["seed"][row, 0])) if "seed" in arrays
            else secrets.randbelow(MAX_SEED + 1))
    fixed = None
    if "prologue_ids" in arrays:
        fixed = check_prologue_ids(arrays["prologue_ids"][row:row + 1], 1, bundle.vocab)
    return Job(classes=classes, seed=seed, settings=settings, prologue_ids=fixed)

