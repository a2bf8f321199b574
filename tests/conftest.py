import os
from pathlib import Path

import numpy as np
import pytest

from .runtime_fixture import CASES  # noqa: F401  the torch reference's cases (torch-free to import)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PROLOGUE_SHARED", REPO.parent / "shared"))
REFERENCE = SHARED / "reference"
FIXTURE_A = REFERENCE / "fixture_a"
OFFICIAL_KEYS = REFERENCE / "official_keys"


def _need_reference():
    if not REFERENCE.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"reference data not found at {REFERENCE} (CI must provide ../shared)")
        pytest.skip(f"reference data not found at {REFERENCE}; set PROLOGUE_SHARED")


@pytest.fixture(scope="session")
def reference_dir():
    _need_reference()
    return REFERENCE


@pytest.fixture(scope="session")
def runtime_fixture_root(tmp_path_factory):
    """The runtime tests' bundles and torch reference (tests/runtime_fixture.py), built once per
    session: `$PROLOGUE_TEST_BUNDLE_DIR` where given (the torch-free run), else built with torch."""
    given = os.environ.get("PROLOGUE_TEST_BUNDLE_DIR")
    if given:
        return Path(given)
    pytest.importorskip("torch", reason="no torch and no PROLOGUE_TEST_BUNDLE_DIR")
    from tests.runtime_fixture import build

    return build(tmp_path_factory.mktemp("runtime-fixture"))


@pytest.fixture(scope="session")
def prepared(runtime_fixture_root):
    """(root, reference.npz): the runtime tests' bundles and the torch reference outputs of CASES."""
    return runtime_fixture_root, np.load(runtime_fixture_root / "reference.npz")


def pixels_match(got, ref_u8, ref_float):
    """`got` (uint8) is the torch reference's image: equal, or one off only where 127.5 * x + 128
    lies within 1e-3 of an integer (where the floor can go either way)."""
    diff = np.abs(got.astype(int) - ref_u8.astype(int))
    y = 127.5 * ref_float.astype(np.float64) + 128
    near = np.abs(y - np.round(y)) < 1e-3
    assert diff.max() <= 1 and np.all(near[diff == 1])


@pytest.fixture(autouse=True)
def _seed():
    try:  # the runtime-only environment has no torch
        import torch
    except ImportError:
        return
    torch.manual_seed(0)


def randomize_(module, seed: int = 0, scale: float = 1.0):
    """Give every parameter O(1) random values so that every gate, norm and bias matters.

    Mirrors how fixture_a was made: default inits leave norm offsets at 0 and would hide bugs.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2 and not name.endswith("learnable_query"):
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) * scale / fan_in**0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module
