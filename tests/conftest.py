"""Test tiers, interpreter switch, seeding, NaN-poisoning and the one tolerance helper.

TRITON_INTERPRET must be set before any kernel module is imported (triton.jit reads it at decoration time), so it is
set here, at conftest import, whenever there is no CUDA device.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
GPU = torch.cuda.is_available() and not INTERPRET
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # top-level scripts (model.py, kernels/, ...) are imported as modules

import pytest  # noqa: E402

# Tolerances per dtype (STYLE.md): output ratio/atol and gradient ratio/atol. ratio = RMSE(out - ref) / RMS(ref).
TOL = {
    torch.float32: dict(out_ratio=1e-5, out_atol=1e-5, grad_ratio=1e-4, grad_atol=None),
    torch.float16: dict(out_ratio=5e-3, out_atol=1e-2, grad_ratio=5e-3, grad_atol=None),
    torch.bfloat16: dict(out_ratio=1e-2, out_atol=2e-2, grad_ratio=None, grad_atol=5e-2),
}


def assert_close(name, ref, out, dtype=torch.float32, grad=False, ratio=None, atol=None):
    """Compare `out` to `ref` (computed in fp32/fp64) by RMSE ratio and max-abs; print both on failure."""
    tol = TOL[dtype]
    ratio = ratio if ratio is not None else tol["grad_ratio" if grad else "out_ratio"]
    atol = atol if atol is not None else tol["grad_atol" if grad else "out_atol"]
    ref, out = ref.detach().double(), out.detach().double()
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != ref {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values in output (unwritten elements?)"
    diff = out - ref
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    rms_ratio = (diff.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-12)).item() if diff.numel() else 0.0
    ok = True
    if ratio is not None:
        ok &= rms_ratio <= ratio
    if atol is not None and ratio is None:
        ok &= max_abs <= atol
    elif atol is not None:  # both given: the ratio must hold, and max-abs within atol unless the values are large
        ok &= max_abs <= atol or rms_ratio <= ratio / 10
    assert ok, f"{name}: max_abs={max_abs:.3e} rms_ratio={rms_ratio:.3e} (ratio<={ratio}, atol<={atol}, {dtype})"


def pytest_collection_modifyitems(config, items):
    markexpr = config.getoption("-m") or ""
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (not interpreting)")
    for item in items:
        if "gpu" in item.keywords and not GPU:
            item.add_marker(skip_gpu)
        for mark in ("slow", "sm90"):  # opt-in tiers: minutes each
            if mark in item.keywords and mark not in markexpr:
                item.add_marker(pytest.mark.skip(reason=f"{mark}: run with -m {mark}"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    """fla's trick: every float torch.empty* comes back full of NaN, so an output a kernel forgets to write fails."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))
    yield
    if "torch._dynamo" in sys.modules:  # dynamo caches its map of torch functions once built (AdamW's constructor
        sys.modules["torch._dynamo"].trace_rules.clear_lru_cache()  # builds it): not with these lambdas in it


@pytest.fixture(scope="module")
def one_thread():
    """Tiny ops: one thread is ~100x faster than two fighting over a loaded 2-core box (a module asks for it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def triton_backend():
    """Force the Triton kernels (interpreted on CPU) for one test, then restore the previous backend."""
    import kernels
    previous = kernels.backend()
    kernels.set_backend("triton")
    yield
    kernels.set_backend(previous)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A small synthetic corpus (512-id tokenizer, 8 documents with planted facts) prepared once per session; tests
    that damage data copy it first."""
    import prepare
    out = str(tmp_path_factory.mktemp("synthetic"))
    prepare.main(["--synthetic", "--out", out, "--vocab-size", "512", "--syn-docs", "8", "--syn-chars", "40000"])
    return out


class TorchOps:
    """Context manager listing the torch compute ops dispatched inside it (allocations, views and conftest's NaN
    fills are free: no kernel), to prove that a kernel call launches nothing around its kernels."""
    FREE = ("empty", "empty_like", "view", "expand", "as_strided", "detach", "alias", "t.", "transpose", "slice",
            "unsqueeze", "select", "_unsafe_view", "ones_like")  # ones_like: autograd's seed gradient

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func).split("aten.")[-1]
                poison = name.startswith("fill_") and args[1] != args[1]  # _poison_empty's NaN fill
                if not name.startswith(outer.FREE) and not poison:
                    outer.ops.append(name)
                return func(*args, **(kwargs or {}))

        self.ops, self.mode = [], Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


@pytest.fixture
def launches(monkeypatch):
    """Names of the Triton kernels launched (recorded by kernels._util.LAUNCH_HOOK instead of run)."""
    from kernels import _util
    names = []
    monkeypatch.setattr(_util, "LAUNCH_HOOK", lambda tuned, grid, args, kwargs: names.append(tuned.fn.__name__))
    return names
