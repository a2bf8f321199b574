"""The runtime's public API: generate, vary and reconstruct images from a bundle, without torch.

>>> from prologue_export.runtime import Generator
>>> gen = Generator.from_bundle("runs/demo/bundle")     # backend="auto" picks the best available
>>> images = gen.generate([3, 3, 7], seed=0, cfg=2.0)   # uint8 [3, H, W, C]
>>> more = gen.variations(images[0], n=4, seed=1)        # same prologue, new visual tokens
>>> same = gen.reconstruct(images)                       # encode + decode

A Generator is safe to share between threads: the ONNX Runtime sessions are shared (their `run`
is thread safe) and every call keeps its own KV cache and noise stream.
"""

from __future__ import annotations

import functools
import typing

import numpy as np

from .bundle import MAX_KV_CACHE_BYTES, Bundle, BundleError, kv_cache_bytes
from .contract import AR_STEP, AR_WEIGHTS, DECODER, PROLOGUE_GENERATOR, ar_graph_name
from .images import ImageError, as_hwc, as_nchw, check_images
from .loop import (MAX_IMAGES_PER_CALL, InputError, Noise, TokenLoop, close_if_any, as_array, check_class_ids, check_count,
                   check_progress, check_prologue_ids, check_seed, short_repr, split_tokens)
from .settings import ConfigError, SamplingConfig, check_top_k

BACKENDS = ("auto", "onnxruntime", "cpu", "cuda", "tensorrt")


def make_backend(bundle: Bundle, backend: str = "auto", providers=None, threads: typing.Optional[int] = None,
                 ar_weights: str = "fp32"):
    """`auto` (best ONNX Runtime provider available), `onnxruntime`/`cpu`/`cuda` (ONNX Runtime
    providers), or `tensorrt` (the bundle's TensorRT engines through cuda-python)."""
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "tensorrt":
        if ar_weights != "fp32":
            raise InputError("ar_weights applies to ONNX Runtime graphs; TensorRT engines carry their own precision "
                             "(prologue build-engines --precision)")
        from .tensorrt_backend import TensorRTBackend

        return TensorRTBackend(bundle)
    from .onnx_backend import OrtBackend

    if providers is None:
        providers = {"auto": "auto", "onnxruntime": "auto", "cpu": "cpu", "cuda": "cuda"}[backend]
    if ar_weights not in AR_WEIGHTS:
        raise InputError(f"ar_weights must be one of {', '.join(AR_WEIGHTS)}, got {ar_weights!r}")
    ar_graph = ar_graph_name(ar_weights)
    if AR_STEP in bundle.graphs and ar_graph not in bundle.graphs:
        raise BundleError(f"{bundle.path} has no {ar_weights} AR graph; export it with "
                          f"`prologue export ... --ar-weights {ar_weights}`")
    return OrtBackend(bundle, providers, intra_op_threads=threads, ar_graph=ar_graph)


class Generation:
    """One generation in progress (the stepwise interface): `step()` until `done`, then `images()`.

    Its KV cache (device memory on a GPU backend) is freed when the last token is sampled or
    `run()` raises; a generation abandoned before that must be closed: `close()` (idempotent), or
    `with gen.start(...) as run: ...`. Tokens and images stay available after closing."""

    def __init__(self, generator: "Generator", loop: TokenLoop):
        self.generator, self.loop = generator, loop

    def close(self) -> None:
        self.loop.close()

    def __enter__(self) -> "Generation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def done(self) -> bool:
        return self.loop.done

    @property
    def tokens(self) -> np.ndarray:
        """AR sequences so far `[B, T]`: `[prologue + offset ; EOS ; visual]`."""
        return self.loop.tokens

    def step(self) -> np.ndarray:
        return self.loop.step()

    def run(self, progress=None) -> "Generation":
        self.loop.run(progress)
        return self

    def ids(self) -> typing.Tuple[np.ndarray, np.ndarray]:
        """(raw prologue ids `[B, Z]`, visual ids `[B, X]`) of a finished generation."""
        if not self.done:
            raise InputError("the generation has not finished: call step() until done")
        return split_tokens(self.loop.tokens, self.generator.bundle.vocab)

    def images(self) -> np.ndarray:
        return self.generator.decode(self.ids()[1])


class Generator:
    def __init__(self, bundle: Bundle, backend):
        self.bundle = bundle
        self.backend = backend

    @classmethod
    def from_bundle(cls, path, backend: str = "auto", providers=None, threads: typing.Optional[int] = None,
                    ar_weights: str = "fp32", digest: typing.Optional[str] = None) -> "Generator":
        """threads: intra-op threads of the ONNX Runtime sessions (default: one for a graph under
        8 MB, all logical CPUs for larger ones);
        ar_weights: `fp32`, or a weight-only quantized AR graph the bundle carries (`int8`, `int4`);
        digest: the sha256 of the bundle's manifest.json to pin it (`Bundle(path).digest`).
        `path` may be a loaded `Bundle` (its digest is then compared with `digest`, if given)."""
        if isinstance(path, Bundle):
            bundle = path
            if digest is not None and digest != bundle.digest:
                raise BundleError(f"{bundle.path / 'manifest.json'} has sha256 {bundle.digest}, not the expected "
                                  f"{digest}: this is not the bundle you pinned")
        else:
            bundle = Bundle(path, digest=digest)
        return cls(bundle, make_backend(bundle, backend, providers, threads, ar_weights))

    def close(self) -> None:
        """Release the backend's shared resources where it has any (the TensorRT backend's stream
        and idle execution contexts); generations still running keep their own. Idempotent."""
        close_if_any(self.backend)

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @property
    def max_batch(self) -> int:
        return int(getattr(self.backend, "max_batch", None) or self.bundle.max_batch)

    # -- settings -----------------------------------------------------------------------------

    def settings(self, sampling=None, **overrides) -> SamplingConfig:
        """The bundle's sampling defaults, updated by `sampling` (a dict, our or the release's
        option names) and keyword overrides (`cfg`, `temperature`, `top_k`, `top_p`, ...)."""
        try:
            settings = self.bundle.sampling_defaults.updated(sampling, **overrides)
            check_top_k(settings.top_k, self.bundle.vocab, getattr(self.backend, "top_k_max", None))
        except ConfigError as exc:
            raise InputError(str(exc)) from None
        return settings

    # -- generation ---------------------------------------------------------------------------

    def start(self, class_ids, seed=None, uniform=None, prologue_ids=None, sampling=None, **overrides) -> Generation:
        """One stepwise generation of the whole batch (at most MAX_IMAGES_PER_CALL images) in one KV cache."""
        self._require_ar()
        settings = self.settings(sampling, **overrides)
        classes = check_class_ids(class_ids, self.bundle.num_classes)
        noise = Noise(len(classes), self.bundle.vocab.seq_len, self.bundle.vocab.vocab_size, seed=seed, uniform=uniform)
        return self.generation(classes, noise, settings, prologue_ids)

    def generation(self, class_ids, noise, settings: SamplingConfig, prologue_ids=None) -> Generation:
        """One stepwise generation of the rows `class_ids` `[B]` drawing `noise.at(step)` `[B, V]`
        (a `Noise`, or rows of several requests' streams side by side: `prologue serve`'s batcher),
        with `settings` (a SamplingConfig; checked again here) and optionally fixed `prologue_ids`
        `[B, Z]`. What `start`, `sample_tokens` and the server's batcher all run."""
        self._require_ar()
        if not isinstance(settings, SamplingConfig):
            raise InputError(f"settings must be a SamplingConfig (from Generator.settings), got {type(settings).__name__}")
        settings = self.settings(settings)
        return Generation(self, TokenLoop(self._ar_state, self.bundle.vocab, self.bundle.num_classes, class_ids,
                                          settings, noise, prologue_ids=prologue_ids))

    def _require_ar(self) -> None:
        if AR_STEP not in self.bundle.graphs:
            raise BundleError(f"{self.bundle.path} has no ar_step graph (exported from a tokenizer-only checkpoint)")

    def _ar_state(self, rows: int, batch: int):
        """Each generation's KV cache, from the backend: on the GPU where it can, else on the host."""
        static = "batch" not in self.bundle.graphs[AR_STEP].get("dynamic_axes", {})  # exported with --max-batch 1
        if static and batch > self.max_batch:
            raise InputError(f"batch {batch} is larger than this bundle's graphs take ({self.max_batch}: exported with "
                             "--max-batch 1); generate one image per call or re-export with prologue export --max-batch N")
        cache = kv_cache_bytes(self.bundle.ar, rows)
        if cache > MAX_KV_CACHE_BYTES:  # a stepwise `start` holds its whole batch in one cache
            raise InputError(f"a batch of {batch} needs a KV cache of {cache / 1024**3:.3g} GiB, more than "
                             f"{MAX_KV_CACHE_BYTES // 1024**3} GiB: generate in smaller batches")
        try:
            return self.backend.ar_state(rows, batch, self.bundle.ar_cache_shape(rows))
        except MemoryError:  # within the bound but more than this machine has
            raise InputError(f"a batch of {batch} needs a KV cache of {cache / 1024**3:.3g} GiB, more memory than this "
                             "machine could allocate: generate in smaller batches") from None

    def sample_tokens(self, class_ids, seed=None, uniform=None, prologue_ids=None, sampling=None, progress=None,
                      **overrides) -> np.ndarray:
        """AR sequences `[B, T]` of up to MAX_IMAGES_PER_CALL images, run in chunks of `max_batch`
        images: memory holds one chunk's KV cache and one `[chunk, V]` noise block, whatever B.
        Each chunk draws its own rows of the whole batch's noise stream (`Noise`), so the tokens
        are those of one `TokenLoop` over all B (same seed, same tokens as the torch reference).
        Everything is checked before the first chunk runs; `progress(done, total)` counts the
        steps of all chunks."""
        self._require_ar()
        settings = self.settings(sampling, **overrides)
        vocab, num_classes = self.bundle.vocab, self.bundle.num_classes
        classes = check_class_ids(class_ids, num_classes)
        B, T, V = len(classes), vocab.seq_len, vocab.vocab_size
        noise = Noise(B, T, V, seed=seed, uniform=uniform)  # seed / uniform checked once
        fixed = None if prologue_ids is None else check_prologue_ids(prologue_ids, B, vocab)
        check_progress(progress)
        size = max(1, self.max_batch)
        chunks = -(-B // size)
        tokens = np.zeros((B, T), dtype=np.int64)
        for index, first in enumerate(range(0, B, size)):
            rows = slice(first, first + size)
            count = len(classes[rows])
            chunk_noise = (Noise(count, T, V, uniform=noise.uniform[rows]) if noise.uniform is not None
                           else Noise(count, T, V, seed=seed, rows=(first, B)))
            report = None if progress is None else functools.partial(_chunk_progress, progress, index * T, chunks * T)
            with self.generation(classes[rows], chunk_noise, settings,
                                 None if fixed is None else fixed[rows]) as run:
                tokens[rows] = run.run(report).tokens
        return tokens

    def generate(self, class_ids, seed=None, uniform=None, sampling=None, progress=None, **overrides) -> np.ndarray:
        """Class-conditional images, uint8 `[B, H, W, C]` (`class_ids` may hold the null class; at
        most MAX_IMAGES_PER_CALL), generated `max_batch` at a time (`sample_tokens`). Each chunk's
        state is freed before the next starts and before this returns, whether it succeeds or raises."""
        tokens = self.sample_tokens(class_ids, seed=seed, uniform=uniform, sampling=sampling, progress=progress,
                                    **overrides)
        return self.images_of(tokens)

    def variation_settings(self, class_id=None, sampling=None, **overrides) -> typing.Tuple[int, SamplingConfig]:
        """The class and settings of a variations request: without `class_id` the null class, and
        CFG off unless `cfg` is given (there is no class to guide towards). Refuses a bundle
        without a prologue. `variations` and `prologue serve` both ask this."""
        if not self.bundle.vocab.has_prologue:
            raise BundleError("this bundle's model has no prologue (a '2d' baseline): variations need one")
        if class_id is None:
            class_id = self.bundle.null_class
            overrides.setdefault("cfg", 0.0)
        nc = self.bundle.num_classes
        if isinstance(class_id, (bool, np.bool_)) or not isinstance(class_id, (int, np.integer)) or not 0 <= class_id <= nc:
            raise InputError(f"class_id must be an integer in [0, {nc}] ({nc} = the null class), got {short_repr(class_id)}")
        return int(class_id), self.settings(sampling, **overrides)

    def variations(self, image, n: int, seed=None, class_id: typing.Optional[int] = None, sampling=None,
                   progress=None, **overrides) -> np.ndarray:
        """`n` images (1 .. MAX_IMAGES_PER_CALL) sharing the prologue of `image` (uint8 `[H, W, C]`),
        visual tokens resampled (`variation_settings`: the null class and no CFG without `class_id`)."""
        n = check_count(n)
        class_id, settings = self.variation_settings(class_id, sampling, **overrides)  # checked before the encoder runs
        if seed is not None:
            check_seed(seed)
        check_progress(progress)
        prologue_ids, _ = self.encode(check_images(as_array(image, "image"), self.bundle.image_size,
                                                   self.bundle.channels)[:1])
        tokens = self.sample_tokens(np.full(n, class_id), seed=seed, prologue_ids=np.repeat(prologue_ids, n, axis=0),
                                    sampling=settings, progress=progress)
        return self.images_of(tokens)

    # -- token sequences ----------------------------------------------------------------------

    def prologue_of(self, tokens) -> np.ndarray:
        """Raw prologue ids `[B, Z]` of AR sequences `[B, T]` (what `variations` keeps fixed)."""
        return split_tokens(np.asarray(tokens), self.bundle.vocab)[0]

    def images_of(self, tokens) -> np.ndarray:
        """uint8 images `[B, H, W, C]` of AR sequences `[B, T]`: their visual ids through the decoder."""
        return self.decode(split_tokens(np.asarray(tokens), self.bundle.vocab)[1])

    # -- tokenizer graphs ---------------------------------------------------------------------

    def decode(self, visual_ids) -> np.ndarray:
        """visual ids `[B, X]` -> uint8 `[B, H, W, C]`."""
        v = self.bundle.vocab
        ids = as_array(visual_ids, "visual_ids")
        if ids.ndim != 2 or ids.shape[1] != v.num_visual_tokens or ids.dtype.kind not in "iu":
            raise InputError(f"visual_ids must be integer [B, {v.num_visual_tokens}], got {list(ids.shape)} {ids.dtype}")
        if not 1 <= len(ids) <= MAX_IMAGES_PER_CALL:
            raise InputError(f"visual_ids must hold 1 to {MAX_IMAGES_PER_CALL} rows (images per call), got {len(ids)}")
        if ids.size and (ids.min() < 0 or ids.max() >= v.visual_codebook_size):
            raise InputError(f"visual ids must lie in [0, {v.visual_codebook_size})")
        out = []
        for chunk in self._chunks(ids):
            image = self.backend.run(DECODER, {"visual_ids": chunk.astype(np.int64)}, ["image"])[0]
            self.bundle.check_outputs(DECODER, {"image": image}, {"batch": len(chunk)})  # the manifest's shape, uint8
            out.append(image)
        return as_hwc(np.concatenate(out))

    def encode(self, images) -> typing.Tuple[np.ndarray, np.ndarray]:
        """uint8 `[B, H, W, C]` -> (raw prologue ids `[B, Z]`, visual ids `[B, X]`)."""
        images = check_images(as_array(images, "images"), self.bundle.image_size, self.bundle.channels)
        if len(images) > MAX_IMAGES_PER_CALL:
            raise InputError(f"{len(images)} images: at most {MAX_IMAGES_PER_CALL} per call; split the request")
        v, parts = self.bundle.vocab, []
        for chunk in self._chunks(images):
            prologue, visual = self.backend.run(PROLOGUE_GENERATOR, {"image": as_nchw(chunk)},
                                                ["prologue_ids", "visual_ids"])
            self.bundle.check_outputs(PROLOGUE_GENERATOR, {"prologue_ids": prologue, "visual_ids": visual},
                                      {"batch": len(chunk)})
            self.bundle.check_ids(PROLOGUE_GENERATOR, "prologue_ids", prologue, max(1, v.prologue_codebook_size))
            self.bundle.check_ids(PROLOGUE_GENERATOR, "visual_ids", visual, v.visual_codebook_size)
            parts.append((prologue, visual))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def reconstruct(self, images) -> np.ndarray:
        """uint8 `[B, H, W, C]` -> their reconstructions through the visual tokens."""
        return self.decode(self.encode(images)[1])

    def _chunks(self, array: np.ndarray):
        step = self.max_batch
        for i in range(0, len(array), step):
            yield array[i:i + step]


def _chunk_progress(progress, base: int, total: int, done: int, _steps: int) -> None:
    progress(base + done, total)


def parse_images(paths: typing.Sequence[str], bundle: Bundle) -> np.ndarray:
    from .images import load_image

    if not paths:
        raise ImageError("give at least one image")
    return np.stack([load_image(p, bundle.image_size, bundle.channels) for p in paths])
