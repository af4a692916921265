"""Row kernels on CUDA (compiled Triton, not the interpreter) against their torch twins."""

import pytest
import torch

import dlo_kernels
from dlo import ops
from dlo_kernels import reference

pytestmark = pytest.mark.gpu

# Both sides compute in fp32 and round once to the output dtype, so values differ by at most a
# rounding step; dgate is a length-d fp32 sum whose order differs, so its tolerance grows with d.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
       torch.float16: dict(atol=1e-3, rtol=1e-3)}
DTYPES = list(TOL)
# (M = B*T rows, N active, d): up to T=4096 tokens (two sequences) at d=4096.
SHAPES = [(1, 1, 67), (4096, 0, 130), (4096, 4096, 4096), (8192, 2048, 4096), (8192, 5, 4096), (3000, 1500, 1000)]


def _inputs(M, N, d, dtype):
    index = torch.randperm(M, device="cuda")[:N]
    h = torch.randn(M, d, device="cuda", dtype=dtype)
    f = torch.randn(N, d, device="cuda", dtype=dtype)
    gate = torch.rand(N, device="cuda") * 1.5 - 0.25  # fp32 gate, as the routers produce it
    return h, f, gate, index


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,d", SHAPES)
def test_gather(M, N, d, dtype):
    x, grad, _, index = _inputs(M, N, d, dtype)
    assert torch.equal(dlo_kernels.gather_rows_forward(x, index), reference.gather_rows(x, index))
    assert torch.equal(dlo_kernels.gather_rows_backward(grad, index, M),
                       reference.gather_rows_backward(grad, index, M))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,d", SHAPES)
def test_combine(M, N, d, dtype):
    h, f, gate, index = _inputs(M, N, d, dtype)
    dy = torch.randn_like(h)
    tol = TOL[dtype]
    torch.testing.assert_close(dlo_kernels.scatter_combine_forward(h, f, gate, index),
                               reference.scatter_combine(h, f, gate, index), **tol)
    got = dlo_kernels.scatter_combine_backward(dy, h, f, gate, index)
    want = reference.scatter_combine_backward(dy, h, f, gate, index)
    for name, g, w in zip(("dh", "df"), got, want):
        torch.testing.assert_close(g, w, **tol, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(got[2], want[2], atol=1e-4 * d**0.5, rtol=1e-4)  # dgate


def test_mixed_dtypes_autocast_shape():
    """fp32 residual h, bf16 layer output f, fp32 gate."""
    h, _, gate, index = _inputs(4096, 1000, 2048, torch.float32)
    f = torch.randn(1000, 2048, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(dlo_kernels.scatter_combine_forward(h, f, gate, index),
                               reference.scatter_combine(h, f, gate, index), atol=1e-5, rtol=1e-5)
    got = dlo_kernels.scatter_combine_backward(torch.randn_like(h), h, f, gate, index)
    assert [g.dtype for g in got] == [torch.float32, torch.bfloat16, torch.float32]


def test_offsets_past_int32():
    """M * d > 2**31 elements: row offsets must be computed in int64."""
    M, d = 2**31 // 4096 + 8, 4096
    h = torch.randn(M, d, device="cuda", dtype=torch.bfloat16)
    index = torch.tensor([0, M - 1, M - 5], device="cuda")
    assert torch.equal(dlo_kernels.gather_rows_forward(h, index), h[index])
    f = torch.randn(3, d, device="cuda", dtype=torch.bfloat16)
    gate = torch.ones(3, device="cuda")
    y = dlo_kernels.scatter_combine_forward(h, f, gate, index)
    assert torch.equal(y[index], f) and torch.equal(y[1:M - 5], h[1:M - 5])


def test_kernels_are_compiled_not_interpreted():
    from dlo_kernels.combine import _combine_fwd_kernel
    from dlo_kernels.utils import interpreted

    assert not interpreted(_combine_fwd_kernel), "TRITON_INTERPRET is on: these tests would not test the GPU"


def test_auto_dispatch_uses_triton(monkeypatch):
    monkeypatch.delenv("DLO_KERNELS", raising=False)
    h, f, gate, index = _inputs(64, 10, 32, torch.bfloat16)
    assert ops.kernel_backend(h) == "triton"
    calls = []
    real = dlo_kernels.combine.scatter_combine_forward
    monkeypatch.setattr(dlo_kernels.combine, "scatter_combine_forward", lambda *a: calls.append(1) or real(*a))
    ops.scatter_combine(h, f, gate, index)
    assert calls == [1]


@pytest.mark.parametrize("granularity", ["block", "mlp"])
def test_routed_model_training_step_triton_equals_torch(monkeypatch, granularity):
    """A routed model's forward and every gradient with the compiled kernels against the torch path."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    import dlo

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = dlo.attach_routers(LlamaForCausalLM(config), dlo.RoutingConfig(
        layers=[1, 2, 3], capacity=0.5, granularity=granularity, label="cos-global")).cuda().train()
    for layer in dlo.routed_layers(model):
        torch.nn.init.normal_(layer.router.weight, std=0.2)
    ids = torch.randint(3, 256, (4, 200), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("DLO_KERNELS", backend)
        twin = copy.deepcopy(model)
        out = twin(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        results[backend] = (out.logits.detach(), {n: p.grad for n, p in twin.named_parameters()})
    (logits_t, grads_t), (logits_k, grads_k) = results["torch"], results["triton"]
    torch.testing.assert_close(logits_k, logits_t, atol=1e-4, rtol=1e-4)
    for name, grad in grads_t.items():
        torch.testing.assert_close(grads_k[name], grad, atol=1e-4, rtol=1e-3, msg=lambda m, name=name: f"{name}: {m}")
