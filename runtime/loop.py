"""The host side of generation: drives the `ar_step` graph over a KV cache.

Backend-neutral: the loop takes a state factory `make_state(rows, batch) -> state`, one state per
generation, whose `step(feeds)` runs `ar_step` on the per-step inputs (`contract.step_feeds`)
and its own KV cache, updates the cache and returns the sampled tokens `[B]`. `HostKVState` is
the state of a backend whose cache lives in host memory; device backends keep theirs on the
GPU. A state frees what it holds in `close()` (idempotent; a no-op where nothing is held), and
the loop closes its state when the generation ends (see `TokenLoop`). Noise follows DESIGN.md §3: one
`rng.random((B, V), dtype=float32)` per AR position, in order, forced positions included, from
`numpy.random.Generator(PCG64(seed))`, or an explicit `uniform [B, T, V]`.
"""

from __future__ import annotations

import typing

import numpy as np

from .contract import step_feeds
from .errors import PrologueError, short_repr
from .settings import SamplingConfig, VocabLayout, cfg_enabled, cfg_scale_at


class InputError(PrologueError, ValueError):
    """Bad arguments to a generation call; the message says what was expected."""


MAX_IMAGES_PER_CALL = 1024  # images (rows) per generate / variations / decode / encode call; see docs/runtime.md
MAX_SEED = 2**64 - 1  # seeds are 64-bit: PCG64 takes more, but a seed must fit every report and the CLI


def as_array(value, what: str) -> np.ndarray:
    """`np.asarray(value)`, with any failure (ragged lists, objects that refuse) as a one-line InputError."""
    try:
        return np.asarray(value)
    except Exception as exc:  # ragged lists (ValueError), hostile __array__ / __len__ (anything)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{what} must be a rectangular array of numbers ({reason})") from None


def check_count(n, what: str = "n") -> int:
    """An image count: a Python or numpy integer (not a bool) in [1, MAX_IMAGES_PER_CALL]."""
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_IMAGES_PER_CALL:
        raise InputError(f"{what} must be an integer >= 1 and <= {MAX_IMAGES_PER_CALL} (images per call), got {short_repr(n)}")
    return int(n)


def check_seed(seed) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise InputError(f"seed must be a non-negative integer below 2**64, got {short_repr(seed)}")
    return int(seed)


def check_progress(progress) -> None:
    if progress is not None and not callable(progress):
        raise InputError(f"progress must be a callable (done, total) or None, got {type(progress).__name__}")


class Noise:
    """This generation's uniform noise, one `[B, V]` float32 block per AR position.

    With `seed`: the stream of `numpy.random.Generator(PCG64(seed))`, one `rng.random((total, V),
    float32)` per position, of which this generation takes rows `first .. first + B` (`rows =
    (first, total)`; default `(0, B)`, the whole batch). `Generator.random(float32)` turns each
    32-bit output of the bit generator into one number, in C order, and PCG64 keeps the unused half
    of a 64-bit output in its state; so the `(total, V)` draw of position `t` is the uint32 stream
    from `t * total * V` on, and a chunk's rows are reached by `PCG64.advance` (64-bit outputs; it
    drops the kept half) plus one discarded 32-bit draw where the offset is odd. A chunked
    generation therefore sees exactly the numbers of the one-batch stream (tests/test_noise.py).
    Forced positions (fixed prologue) are skipped, not drawn.

    With `uniform`: this generation's rows `[B, T, V]`, each finite and in (0, 1) after float32
    conversion (0 would give a -inf Gumbel, 1 a +inf one). The seeded stream can hold an exact 0
    (probability 2**-24 a number): that token is then never chosen, as in the torch reference.
    """

    def __init__(self, batch: int, seq_len: int, vocab_size: int, seed=None, uniform=None, rows=None):
        if (seed is None) == (uniform is None):
            raise InputError("give exactly one of `seed` (an int) or `uniform` (an array [B, T, V])")
        self.shape = (batch, vocab_size)
        self.first, self.total = rows if rows is not None else (0, batch)
        if not 0 <= self.first <= self.total - batch:
            raise InputError(f"noise rows {self.first} .. {self.first + batch} lie outside a batch of {self.total}")
        self.uniform = None
        self.rng = None
        if uniform is not None:
            self.uniform = check_uniform(uniform, (batch, seq_len, vocab_size))
        else:
            self.seed = check_seed(seed)
            self._restart()

    def _restart(self) -> None:
        self.bits = np.random.PCG64(self.seed)
        self.rng = np.random.Generator(self.bits)
        self.drawn = 0  # 32-bit outputs consumed so far

    def _seek(self, offset: int) -> None:
        """Move the stream to its `offset`-th 32-bit output (forward; backward restarts)."""
        if offset < self.drawn:
            self._restart()
        if offset == self.drawn:
            return
        self.bits.advance(offset // 2 - (self.drawn + 1) // 2)  # whole 64-bit outputs; drops a kept half
        if offset % 2:
            self.rng.random(1, dtype=np.float32)  # the low half of the next output
        self.drawn = offset

    def at(self, step: int) -> np.ndarray:
        if self.uniform is not None:
            return np.ascontiguousarray(self.uniform[:, step])
        batch, V = self.shape
        self._seek((step * self.total + self.first) * V)
        out = self.rng.random(self.shape, dtype=np.float32)
        self.drawn += batch * V
        return out


def check_uniform(uniform, shape: tuple) -> np.ndarray:
    u = as_array(uniform, "uniform")
    if u.shape != shape:
        raise InputError(f"uniform must have shape {list(shape)} (B, T, V), got {list(u.shape)}")
    if u.dtype.kind != "f":
        raise InputError(f"uniform must be float noise in (0, 1), got dtype {u.dtype}")
    u = u.astype(np.float32, copy=False)
    if not np.all((u > 0) & (u < 1)):  # NaN fails both
        raise InputError("uniform noise must be finite and lie in (0, 1) after conversion to float32 "
                         "(0 and 1 give infinite Gumbel noise)")
    return u


def check_class_ids(class_ids, num_classes: int) -> np.ndarray:
    if isinstance(class_ids, (list, tuple)) and any(isinstance(c, (bool, np.bool_)) for c in class_ids):
        raise InputError("class_ids must be integers, not true/false")  # numpy would make [1, True] [1, 1]
    ids = as_array(class_ids, "class_ids")
    if ids.ndim == 0:
        ids = ids.reshape(1)
    if ids.size == 0:
        raise InputError("class_ids is empty: give at least one class")
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise InputError(f"class_ids must be a 1-D integer array [B], got shape {list(ids.shape)} dtype {ids.dtype}")
    if len(ids) > MAX_IMAGES_PER_CALL:
        raise InputError(f"{len(ids)} class ids: at most {MAX_IMAGES_PER_CALL} images per call; split the request")
    if ids.min() < 0 or ids.max() > num_classes:
        raise InputError(f"class ids must lie in [0, {num_classes}] ({num_classes} = the null class), "
                         f"got range [{ids.min()}, {ids.max()}]")
    return ids.astype(np.int64)


def check_prologue_ids(prologue_ids, batch: int, vocab: VocabLayout) -> np.ndarray:
    if not vocab.has_prologue:
        raise InputError("this model has no prologue (a '2d' baseline): prologue_ids cannot be fixed")
    p = as_array(prologue_ids, "prologue_ids")
    Z, Kp = vocab.num_prologue_tokens, vocab.prologue_codebook_size
    if p.shape != (batch, Z) or p.dtype.kind not in "iu":
        raise InputError(f"prologue_ids must be integer [B, Z] = [{batch}, {Z}], got {list(p.shape)} {p.dtype}")
    if p.min() < 0 or p.max() >= Kp:
        raise InputError(f"prologue_ids are raw prologue codes in [0, {Kp}); got range [{p.min()}, {p.max()}]")
    return p.astype(np.int64)


def close_if_any(obj) -> None:
    """`obj.close()` where it has one (states and backends may hold nothing to free)."""
    close = getattr(obj, "close", None)
    if close is not None:
        close()


def close_after_error(obj) -> None:
    """Close `obj` while another error is on its way out: a failure to close must not hide it."""
    try:
        close_if_any(obj)
    except Exception:
        pass


class HostKVState:
    """A KV cache in host memory, written in place from each step's new K/V slice.

    `run_step(feeds, k_cache, v_cache)` runs the graph and returns `(next_tokens, k_new, v_new)`.
    `close()` drops the cache arrays (idempotent); a closed state refuses to step."""

    def __init__(self, run_step: typing.Callable, cache_shape: tuple):
        self.run_step = run_step
        self.k_cache = np.zeros(cache_shape, dtype=np.float32)  # [L, R, H, S, d]
        self.v_cache = np.zeros_like(self.k_cache)
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.k_cache = self.v_cache = None

    def __enter__(self) -> "HostKVState":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def step(self, feeds: typing.Dict[str, np.ndarray]) -> np.ndarray:
        if self.closed:
            raise InputError("this generation's KV cache is closed (the generation ended or was closed)")
        next_tokens, k_new, v_new = self.run_step(feeds, self.k_cache, self.v_cache)
        p, n = int(feeds["start_pos"][0]), feeds["input_ids"].shape[1]
        self.k_cache[:, :, :, p:p + n] = k_new
        self.v_cache[:, :, :, p:p + n] = v_new
        return next_tokens


class TokenLoop:
    """Stepwise generation state (feed, step, done), in the manner of onnxruntime-genai.

    >>> loop = TokenLoop(make_state, vocab, num_classes, class_ids, settings, Noise(B, T, V, seed=0))
    >>> while not loop.done: loop.step()
    >>> loop.tokens  # [B, T] in the AR layout: [prologue + offset ; EOS ; visual]

    `make_state(rows, batch)` makes this generation's KV-cache state; `settings` are validated
    where they enter (`Generator.settings`, `SamplingConfig.updated`), not here; `noise.at(step)`
    gives this loop's uniforms `[B, V]` for AR position `step` (`Noise`: a seed's stream or an
    explicit array; `Generator` makes it).

    The state (device memory on a GPU backend) is freed by `close()` (idempotent), which the loop
    calls itself when the last token is sampled and when `run()` raises; a loop stopped early
    must be closed by its owner, or used as a context manager (`with TokenLoop(...) as loop:`).
    The tokens stay readable after `close()`.
    """

    def __init__(self, make_state: typing.Callable[[int, int], typing.Any], vocab: VocabLayout, num_classes: int,
                 class_ids, settings: SamplingConfig, noise, prologue_ids=None):
        self.vocab, self.settings, self.noise = vocab, settings, noise
        self.classes = check_class_ids(class_ids, num_classes)
        B = len(self.classes)
        T, V, Z = vocab.seq_len, vocab.vocab_size, vocab.num_prologue_tokens
        self.use_cfg = cfg_enabled(settings)
        rows = np.concatenate([self.classes, np.full(B, num_classes)]) if self.use_cfg else self.classes
        self.state = None
        self.tokens = np.zeros((B, T), dtype=np.int64)
        self.position = 0  # next cache slot
        self.steps_done = 0  # sampled (or forced) tokens so far
        self.feed = (rows + V)[:, None]  # [R, n] BOS of every row
        if prologue_ids is not None:
            fixed = check_prologue_ids(prologue_ids, B, vocab) + vocab.prologue_offset
            self.tokens[:, :Z] = fixed
            self.steps_done = Z
            prefix = np.concatenate([fixed, fixed]) if self.use_cfg else fixed
            self.feed = np.concatenate([self.feed, prefix], axis=1)  # prefill BOS + prologue
        self.state = make_state(len(rows), B)  # last: nothing after it can fail and leak it

    @property
    def done(self) -> bool:
        return self.steps_done >= self.vocab.seq_len

    @property
    def closed(self) -> bool:
        return self.state is None

    def close(self) -> None:
        """Free this generation's state (its KV cache; device memory on a GPU backend). Idempotent."""
        state, self.state = self.state, None
        close_if_any(state)

    def __enter__(self) -> "TokenLoop":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def step(self) -> np.ndarray:
        """Run one `ar_step` call; returns the tokens just sampled `[B]`. The last step closes the state."""
        if self.done:
            raise InputError("generation is finished: every position has a token")
        if self.closed:
            raise InputError("this generation was closed before it finished; start a new one")
        s, settings = self.steps_done, self.settings
        uniform = self.noise.at(s)
        if uniform.shape != (len(self.classes), self.vocab.vocab_size):
            raise InputError(f"the noise source gave shape {list(uniform.shape)} at step {s}, the loop needs "
                             f"[{len(self.classes)}, {self.vocab.vocab_size}] (B, V)")
        n = self.feed.shape[1]
        next_tokens = self.state.step(step_feeds(
            input_ids=self.feed, start_pos=self.position, uniform=uniform,
            cfg_scale=cfg_scale_at(s, settings, self.vocab) if self.use_cfg else 1.0,
            temperature=settings.temperature_at(s, self.vocab), top_k=settings.top_k, top_p=settings.top_p))
        self.position += n
        next_tokens = np.asarray(next_tokens, dtype=np.int64)
        self.tokens[:, s] = next_tokens
        self.steps_done += 1
        self.feed = (np.concatenate([next_tokens, next_tokens]) if self.use_cfg else next_tokens)[:, None]
        if self.done:
            self.close()
        return next_tokens

    def run(self, progress: typing.Optional[typing.Callable[[int, int], None]] = None) -> np.ndarray:
        """Step until done (which closes the state); on an error the state is closed too."""
        check_progress(progress)
        try:
            while not self.done:
                self.step()
                if progress is not None:
                    progress(self.steps_done, self.vocab.seq_len)
        except BaseException:
            close_after_error(self)
            raise
        return self.tokens


def split_tokens(tokens: np.ndarray, vocab: VocabLayout) -> typing.Tuple[np.ndarray, np.ndarray]:
    """AR sequences `[B, T]` -> (raw prologue ids `[B, Z]`, visual ids `[B, X]`)."""
    Z = vocab.num_prologue_tokens
    return tokens[:, :Z] - vocab.prologue_offset, tokens[:, vocab.visual_start:]
