"""`prologue_export.runtime.loop.Noise`, the uniform noise of a generation: the seeded float32
stream drawn chunk by chunk (any rows of the batch, positions skipped or revisited) is exactly
the one-batch stream.

Its use in whole generations (chunked `sample_tokens` = one batch, explicit `uniform` arrays,
forced prologue positions): tests/test_generator.py; bad `seed` / `uniform` arguments:
tests/test_hostile_runtime.py. Torch-free and bundle-free.
"""

import numpy as np
import pytest

from prologue_export.runtime.loop import Noise


@pytest.mark.parametrize("V", [1, 13, 264, 331])
def test_noise_rows_are_rows_of_the_one_batch_stream(V):
    """The float32 stream drawn chunk by chunk (PCG64.advance + odd offsets) is the one-batch draw."""
    B, T, seed = 7, 5, 12345
    rng = np.random.Generator(np.random.PCG64(seed))
    whole = np.stack([rng.random((B, V), dtype=np.float32) for _ in range(T)], axis=1)  # [B, T, V]
    for size in (1, 2, 3, 4, 7):
        for first in range(0, B, size):
            rows = min(size, B - first)
            noise = Noise(rows, T, V, seed=seed, rows=(first, B))
            for step in (0, 1, 3, 4, 2):  # skipped steps (forced prologue) and going back
                np.testing.assert_array_equal(noise.at(step), whole[first:first + rows, step])
