"""Row kernels on CPU: Triton (interpreter) vs torch twins vs slow loops; dispatch; torch.compile.

TRITON_INTERPRET=1 is set by conftest.py before dlo_kernels is imported, so every launch here
runs the real kernels in the interpreter. Outputs the launchers allocate are NaN-poisoned.
"""

import os
import subprocess
import sys

import pytest
import torch

import dlo_kernels
from dlo import ops
from dlo_kernels import reference

pytestmark = pytest.mark.interpreter

# fp32 throughout (bf16 is slow and wrong-ish in the CPU interpreter). The kernels and twins do
# the same fp32 arithmetic; only dgate's summation order differs (chunked row sums).
TOL = dict(atol=1e-5, rtol=1e-5)

# (M rows, N active, d): one token, none active, all active, d not a power of 2, d=1.
CASES = [(1, 1, 67), (1, 0, 67), (13, 0, 130), (13, 13, 130), (13, 5, 67), (40, 17, 130), (9, 3, 1), (300, 77, 67)]
# Forced small tiles, so the column loop runs several chunks with a ragged tail, and rows split
# over several programs with a partial last one (the heuristic picks one program for these sizes).
SMALL_TILES = [None, (4, 32)]


def _inputs(M, N, d, dtype=torch.float32, f_dtype=None):
    index = torch.randperm(M)[:N]  # unique rows in shuffled order: the kernels must not assume sorted ids
    h = torch.randn(M, d, dtype=dtype)
    f = torch.randn(N, d, dtype=f_dtype or dtype)
    gate = torch.rand(N) * 1.5 - 0.25  # fp32, beyond [0, 1] so 1 - gate changes sign too
    return h, f, gate, index


@pytest.fixture
def poisoned(monkeypatch):
    """Fill every buffer the launchers allocate with NaN (or -7): a row or column they forget stays visible."""
    allocated = []
    real_empty_like, real_new_empty = torch.empty_like, torch.Tensor.new_empty

    def poison(t):
        allocated.append(t)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: poison(real_new_empty(self, *a, **k)))
    return allocated


# ---- slow obvious references -------------------------------------------------------------------

def _loop_gather(x, index):
    return torch.stack([x[int(i)] for i in index]) if len(index) else x[:0].clone()


def _loop_combine(h, f, gate, index):
    y = h.clone()
    for n, i in enumerate(index.tolist()):
        y[i] = h[i] + gate[n] * (f[n] - h[i])
    return y


def _loop_combine_backward(dy, h, f, gate, index):
    dh, df, dgate = dy.clone(), torch.zeros_like(f), torch.zeros_like(gate)
    for n, i in enumerate(index.tolist()):
        dh[i] = (1 - gate[n]) * dy[i]
        df[n] = gate[n] * dy[i]
        dgate[n] = sum(float(dy[i, c]) * float(f[n, c] - h[i, c]) for c in range(h.shape[1]))
    return dh, df, dgate


# ---- twins vs loops ----------------------------------------------------------------------------

@pytest.mark.parametrize("M,N,d", CASES[:-1])
def test_twins_match_loops(M, N, d):
    h, f, gate, index = _inputs(M, N, d)
    dy = torch.randn(M, d)
    torch.testing.assert_close(reference.gather_rows(h, index), _loop_gather(h, index), atol=0, rtol=0)
    torch.testing.assert_close(reference.gather_rows_backward(f, index, M), _loop_combine(
        torch.zeros(M, d), f, torch.ones(N), index), atol=0, rtol=0)  # gate 1 on zeros: a pure scatter
    torch.testing.assert_close(reference.scatter_combine(h, f, gate, index), _loop_combine(h, f, gate, index), **TOL)
    for got, want in zip(reference.scatter_combine_backward(dy, h, f, gate, index),
                         _loop_combine_backward(dy, h, f, gate, index)):
        torch.testing.assert_close(got, want, **TOL)


def test_twin_backward_is_the_gradient():
    """The hand-written backward formulas equal autograd through the loop reference (fp64)."""
    h, f, gate, index = (t.double() if t.is_floating_point() else t for t in _inputs(11, 6, 5))
    h, f, gate = (t.requires_grad_() for t in (h, f, gate))
    dy = torch.randn(11, 5, dtype=torch.float64)
    want = torch.autograd.grad(_loop_combine(h, f, gate, index), (h, f, gate), dy)
    for got, w in zip(reference.scatter_combine_backward(dy, h, f, gate, index), want):
        torch.testing.assert_close(got, w, atol=1e-12, rtol=1e-12)


# ---- Triton (interpreter) vs twins --------------------------------------------------------------

@pytest.mark.parametrize("tiles", SMALL_TILES)
@pytest.mark.parametrize("M,N,d", CASES)
def test_gather_kernel(poisoned, M, N, d, tiles):
    x, grad, _, index = _inputs(M, N, d)
    blocks = dict(zip(("block_rows", "block_cols"), tiles or (None, None)))
    torch.testing.assert_close(dlo_kernels.gather_rows_forward(x, index, **blocks),
                               reference.gather_rows(x, index), atol=0, rtol=0)
    torch.testing.assert_close(dlo_kernels.gather_rows_backward(grad, index, M, **blocks),
                               reference.gather_rows_backward(grad, index, M), atol=0, rtol=0)
    assert poisoned, "the launchers' buffers were not poisoned"


@pytest.mark.parametrize("tiles", SMALL_TILES)
@pytest.mark.parametrize("M,N,d", CASES)
def test_combine_kernel(poisoned, M, N, d, tiles):
    h, f, gate, index = _inputs(M, N, d)
    dy = torch.randn(M, d)
    blocks = dict(zip(("block_rows", "block_cols"), tiles or (None, None)))
    torch.testing.assert_close(dlo_kernels.scatter_combine_forward(h, f, gate, index, **blocks),
                               reference.scatter_combine(h, f, gate, index), **TOL)
    got = dlo_kernels.scatter_combine_backward(dy, h, f, gate, index, **blocks)
    for name, g, w in zip(("dh", "df", "dgate"), got, reference.scatter_combine_backward(dy, h, f, gate, index)):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g, w, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    assert poisoned or N == 0, "the launchers' buffers were not poisoned"


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter evaluates both where() arms
def test_skipped_rows_are_copied_bit_for_bit(poisoned):
    h, f, gate, index = _inputs(6, 2, 8)
    h[:, 0] = float("inf")  # 0 * (f - inf) would be NaN on a skipped row if the kernel blended everywhere
    y = dlo_kernels.scatter_combine_forward(h, f, gate, index)
    skipped = torch.ones(6, dtype=torch.bool).index_fill_(0, index, False)
    assert torch.equal(y[skipped], h[skipped])


def test_mixed_dtypes(poisoned):
    """Autocast shape of the call: fp32 residual h, fp16 layer output f, fp32 gate."""
    h, f, gate, index = _inputs(10, 4, 67, f_dtype=torch.float16)
    dy = torch.randn(10, 67)
    torch.testing.assert_close(dlo_kernels.scatter_combine_forward(h, f, gate, index),
                               reference.scatter_combine(h, f, gate, index), **TOL)
    got = dlo_kernels.scatter_combine_backward(dy, h, f, gate, index)
    for g, w, t in zip(got, reference.scatter_combine_backward(dy, h, f, gate, index), (h, f, gate)):
        assert g.dtype == t.dtype
        torch.testing.assert_close(g, w, atol=2e-3, rtol=2e-3)  # df is fp16


@pytest.mark.parametrize("M,N,d", [(1, 1, 67), (13, 0, 130), (13, 13, 130), (40, 17, 130)])
def test_registered_ops_with_triton_vs_twins(M, N, d):
    """Gradients through the registered ops on the Triton backend, against autograd through the twins."""
    h, f, gate, index = _inputs(M, N, d)
    dy = torch.randn(M, d)

    def run(gather, combine):
        x, w, g = (t.clone().requires_grad_() for t in (h, f, gate))
        y = combine(x, gather(x, index) * w, g, index)  # f depends on x through the gather too
        return (y, *torch.autograd.grad(y, (x, w, g), dy))

    got = run(lambda x, i: torch.ops.dlo.gather_rows(x, i, "triton"),
              lambda x, w, g, i: torch.ops.dlo.scatter_combine(x, w, g, i, "triton"))
    want = run(reference.gather_rows, reference.scatter_combine)
    for name, g, w in zip(("y", "dx", "dw", "dgate"), got, want):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m, name=name: f"{name}: {m}")


# ---- registered ops and dispatch -------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    """Schema, fake impls and autograd registration of the torch.ops.dlo ops."""
    h, f, gate, index = _inputs(9, 4, 6)
    h, f, gate = (t.requires_grad_() for t in (h, f, gate))
    torch.library.opcheck(torch.ops.dlo.gather_rows, (h, index, backend))
    torch.library.opcheck(torch.ops.dlo.scatter_combine, (h, f, gate, index, backend))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dispatch_runs_the_chosen_backend(monkeypatch, backend):
    monkeypatch.setenv("DLO_KERNELS", backend)
    calls = []
    for module, name in [(dlo_kernels.gather, "gather_rows_forward"), (dlo_kernels.gather, "gather_rows_backward"),
                         (dlo_kernels.combine, "scatter_combine_forward"),
                         (dlo_kernels.combine, "scatter_combine_backward")]:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    h, f, gate, index = _inputs(12, 5, 7)
    h, f, gate = (t.requires_grad_() for t in (h, f, gate))
    y = ops.scatter_combine(h, ops.gather_rows(h, index) * f, gate, index)
    y.backward(torch.randn_like(y))
    expected = ["gather_rows_forward", "scatter_combine_forward", "scatter_combine_backward", "gather_rows_backward"]
    assert calls == (expected if backend == "triton" else [])


def test_dispatch_switch(monkeypatch):
    x = torch.zeros(2, 2)
    monkeypatch.delenv("DLO_KERNELS", raising=False)
    assert ops.kernel_backend(x) == "torch"  # auto on CPU
    monkeypatch.setenv("DLO_KERNELS", "Triton")
    assert ops.kernel_backend(x) == "triton"
    monkeypatch.setenv("DLO_KERNELS", "cuda")
    with pytest.raises(ValueError, match="DLO_KERNELS"):
        ops.kernel_backend(x)


def test_triton_on_cpu_without_interpreter_raises():
    code = ("import torch; from dlo import ops\n"
            "try:\n    ops.gather_rows(torch.zeros(3, 2), torch.tensor([1]))\n"
            "except RuntimeError as e:\n    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"DLO_KERNELS": "triton"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "need CUDA tensors" in out.stdout and "DLO_KERNELS=torch" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_compile_traces_routed_mlp(monkeypatch, backend, compiler):
    """A routed MLP update (top-k -> flat ids -> gather -> MLP -> combine) traces with fullgraph=True."""
    monkeypatch.setenv("DLO_KERNELS", backend)
    B, T, d, k = 2, 8, 6, 3
    mlp = torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.SiLU(), torch.nn.Linear(2 * d, d))
    router = torch.nn.Linear(d, 1)

    def routed(h):  # h: (B, T, d)
        scores = router(h).squeeze(-1)  # (B, T)
        idx = torch.sort(torch.topk(scores, k, dim=1).indices, dim=1).values  # (B, k)
        flat = ops.flat_row_index(idx, T)  # (B*k,)
        gate = 1 + 0.05 * (torch.sigmoid(scores.gather(1, idx)) - 0.5)  # (B, k)
        x = h.reshape(B * T, d)
        return ops.scatter_combine(x, mlp(ops.gather_rows(x, flat)), gate.reshape(-1), flat).view(B, T, d)

    torch._dynamo.reset()
    compiled = torch.compile(routed, fullgraph=True, backend=compiler)
    h = torch.randn(B, T, d)
    outs = []
    for fn in (routed, compiled):
        x = h.clone().requires_grad_()
        y = fn(x)
        params = [x, *mlp.parameters(), *router.parameters()]
        outs.append((y, *torch.autograd.grad(y, params, torch.ones_like(y))))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, **TOL)


# ---- index helpers ----------------------------------------------------------------------------------

def test_flat_row_index():
    idx = torch.tensor([[0, 3], [1, 2], [2, 4]])
    assert ops.flat_row_index(idx, 5).tolist() == [0, 3, 6, 7, 12, 14]


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_active_positions(p):
    active = torch.rand(4, 9) < p
    active[1] = False  # a row with nothing active next to rows with some
    idx, valid = ops.active_positions(active)
    counts = active.sum(1)
    assert idx.shape == valid.shape == (4, max(int(counts.max()), 1))
    for b in range(4):
        want = [t for t in range(9) if active[b, t]]
        assert idx[b, : len(want)].tolist() == want  # ascending active positions first
        assert valid[b].tolist() == [True] * len(want) + [False] * (idx.shape[1] - len(want))
        assert not active[b, idx[b, len(want):]].any()  # fillers are inactive tokens...
        assert len(set(idx[b].tolist())) == idx.shape[1]  # ...and never repeat a row id
