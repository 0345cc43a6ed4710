import os

import pytest
import torch
from hypothesis import settings

# The Triton kernels run on CPU tensors through the interpreter; it must be chosen before any
# kernel module is imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hip_attn.interpreter import interpreting  # noqa: E402 (after the variable is set)

if interpreting():
    from tests.interpreter_sort import use_numpy_sort

    use_numpy_sort()

HAS_CUDA = torch.cuda.is_available()

# Property tests (tests/test_properties.py): "ci", the default, replays the same examples on
# every run (derandomized, no example database); HYPOTHESIS_PROFILE=explore draws fresh ones.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("explore", database=None, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def rand_qkv():
    """Fresh random ``q, k, v`` in SDPA layout; a new seed per call site through ``seed``."""

    def make(b, hq, hkv, tq, tk, d, *, dtype=torch.float32, device="cpu", seed=0):
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(b, hq, tq, d, generator=gen)
        k = torch.randn(b, hkv, tk, d, generator=gen)
        v = torch.randn(b, hkv, tk, d, generator=gen)
        return (x.to(device=device, dtype=dtype) for x in (q, k, v))

    return make
