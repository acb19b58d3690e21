"""The memory-traffic meters count exactly the bytes that are moved."""
import pytest
import torch
import triton
import triton.language as tl

import pyvit_ops
from pyvit_ops.testing.traffic import (compulsory_bytes, count_aten_traffic,
                                       count_fused_traffic, count_triton_traffic, tensor_bytes)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@triton.jit
def _copy_kernel(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    tl.store(Y + offs, tl.load(X + offs, mask=mask, other=0.0), mask=mask)


@triton.jit
def _pair_sum_kernel(X, Y, N, BLOCK: tl.constexpr):
    # y[i] = x[i] + x[i + 1]: every x element but the first is loaded twice.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N - 1
    a = tl.load(X + offs, mask=mask)
    b = tl.load(X + offs + 1, mask=mask)
    tl.store(Y + offs, a + b, mask=mask)


@triton.jit
def _atomic_count_kernel(X, COUNT, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + offs, mask=mask, other=0)
    tl.atomic_add(COUNT, tl.sum(x, axis=0))


@triton.jit
def _scalar_mask_copy_kernel(X, Y, N, BLOCK: tl.constexpr):
    # Only the first program copies: a scalar condition as the mask of a block access.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    first = tl.program_id(0) == 0
    tl.store(Y + offs, tl.load(X + offs, mask=first, other=0.0), mask=first)


def _launch(kernel, x, y, block=128):
    kernel[(triton.cdiv(x.numel(), block),)](x, y, x.numel(), BLOCK=block)
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1000, 1, 128])
def test_triton_copy_counts_masked_tail_exactly(dtype, n):
    x = torch.randn(n).to(dtype)
    y, report = count_triton_traffic(_launch, _copy_kernel, x, torch.empty_like(x))
    assert torch.equal(y, x)
    nbytes = n * x.element_size()     # 1000 fp16 -> 2000 B, not the 1024 lanes launched
    assert report["read_bytes"] == report["write_bytes"] == nbytes
    assert report["unique_read_bytes"] == report["unique_write_bytes"] == nbytes
    assert report["total_bytes"] == 2 * nbytes
    assert report["launches"] == 1
    assert report["by_kernel"]["_copy_kernel"]["read_bytes"] == nbytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_repeated_loads_counted_per_access_and_unique(dtype):
    n = 300
    x = torch.randn(n).to(dtype)
    y = torch.zeros(n - 1, dtype=dtype)
    out, report = count_triton_traffic(_launch, _pair_sum_kernel, x, y)
    torch.testing.assert_close(out.float(), (x[:-1] + x[1:]).float())
    size = x.element_size()
    assert report["read_bytes"] == 2 * (n - 1) * size
    assert report["unique_read_bytes"] == n * size
    assert report["write_bytes"] == report["unique_write_bytes"] == (n - 1) * size


def test_triton_scalar_mask_counts_only_the_true_programs():
    x = torch.randn(512)
    y, report = count_triton_traffic(_launch, _scalar_mask_copy_kernel, x, torch.zeros(512))
    assert torch.equal(y[:128], x[:128]) and not y[128:].any()
    assert report["read_bytes"] == report["write_bytes"] == 128 * 4
    assert report["unique_read_bytes"] == report["unique_write_bytes"] == 128 * 4


def test_triton_several_kernels_and_atomics():
    x = torch.ones(200, dtype=torch.int32)
    count = torch.zeros(1, dtype=torch.int32)

    def run():
        _launch(_copy_kernel, x, torch.empty_like(x), block=64)
        _launch(_atomic_count_kernel, x, count, block=64)

    _, report = count_triton_traffic(run)
    assert count.item() == 200
    copy, atomic = report["by_kernel"]["_copy_kernel"], report["by_kernel"]["_atomic_count_kernel"]
    assert copy == {"launches": 1, "read_bytes": 800, "write_bytes": 800,
                    "unique_read_bytes": 800, "unique_write_bytes": 800}
    # 4 programs each read their slice and do one 4-byte atomic read-modify-write
    assert atomic["read_bytes"] == 800 + 4 * 4 and atomic["write_bytes"] == 4 * 4
    assert atomic["unique_write_bytes"] == 4
    # x is read by both kernels: unique across the whole run counts it once
    assert report["unique_read_bytes"] == 800 + 4
    assert report["read_bytes"] == 800 + 816


def test_triton_meter_requires_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="interpreter"):
        count_triton_traffic(lambda: None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 13), (1,)])
def test_aten_composition(dtype, shape):
    x = torch.randn(shape).to(dtype)
    result, report = count_aten_traffic(lambda t: (t * 2 + 1).sum(), x)
    torch.testing.assert_close(result, (x * 2 + 1).sum())
    n = x.numel() * x.element_size()
    s = x.element_size()              # sum returns a 0-d tensor of x's dtype
    assert report["ops"]["aten.mul.Tensor"] == {"calls": 1, "read_bytes": n, "write_bytes": n}
    assert report["ops"]["aten.add.Tensor"] == {"calls": 1, "read_bytes": n, "write_bytes": n}
    assert report["ops"]["aten.sum.default"] == {"calls": 1, "read_bytes": n, "write_bytes": s}
    assert report["read_bytes"] == 3 * n
    assert report["write_bytes"] == 2 * n + s
    assert report["total_bytes"] == 5 * n + s


def test_aten_views_move_nothing_and_inplace_rules():
    x = torch.randn(4, 6)
    out = torch.empty(6, 4)

    def f(t):
        v = t.t()                              # view: 0 bytes
        r = v.reshape(24)                      # non-contiguous: clone (moves) + _unsafe_view (0)
        r.add_(1.0)                            # reads and writes r
        torch.mul(v, 2.0, out=out)             # out= is written, not read
        out.copy_(v)                           # copy_ does not read its destination
        return r.view(4, 6).expand(3, 4, 6).sum()   # expand: x's bytes once

    _, report = count_aten_traffic(f, x)
    ops = report["ops"]
    b = x.numel() * 4
    for view in ("aten.t.default", "aten._unsafe_view.default", "aten.view.default",
                 "aten.expand.default"):
        assert ops[view]["read_bytes"] == ops[view]["write_bytes"] == 0, view
    assert ops["aten.clone.default"] == {"calls": 1, "read_bytes": b, "write_bytes": b}
    assert ops["aten.add_.Tensor"] == {"calls": 1, "read_bytes": b, "write_bytes": b}
    assert ops["aten.mul.out"] == {"calls": 1, "read_bytes": b, "write_bytes": b}
    assert ops["aten.copy_.default"] == {"calls": 1, "read_bytes": b, "write_bytes": b}
    assert ops["aten.sum.default"] == {"calls": 1, "read_bytes": b, "write_bytes": 4}


def test_compulsory_bytes():
    q = torch.empty(2, 3, 5, dtype=torch.float16)
    bias = torch.empty(5, dtype=torch.float32).expand(2, 3, 5)   # broadcast: read once
    out = torch.empty(2, 3, 5, dtype=torch.bfloat16)
    got = compulsory_bytes([q, bias, None, q], out)
    assert got == {"read_bytes": 60 + 20, "write_bytes": 60, "total_bytes": 140}
    assert tensor_bytes(torch.empty(0, 3)) == 0
    with pytest.raises(TypeError, match="inputs must be tensors"):
        compulsory_bytes([q, 3], out)


def test_fused_meter_counts_glue_around_kernels_not_the_interpreters_copies():
    # A bare kernel launch: the interpreter copies its arguments to and from host
    # buffers with aten ops, which must not count as glue (the loads / stores do).
    x = torch.randn(1000)
    _, report = count_fused_traffic(_launch, _copy_kernel, x, torch.empty_like(x))
    assert report["total_bytes"] == 8000 and report["glue"]["total_bytes"] == 0
    # Glue outside the kernels counts: one cast reads 4 B and writes 2 B per element.
    _, report = count_fused_traffic(lambda t: _launch(_copy_kernel, t, torch.empty_like(t))
                                    .to(torch.float16), x)
    assert report["glue"]["total_bytes"] == 6000


@pytest.mark.parametrize("batch", [1, 2])
def test_fused_meter_sees_inside_pyvit_ops_custom_ops(batch):
    # With a bias shared by 2 samples the SDPA backward sums its two fp32 dbias
    # partials and casts the sum to the bias dtype inside the custom op
    # pyvit_ops::scaled_dot_product_attention_bwd: a plain dispatch mode sees only the
    # opaque op; the fused meter counts the cast. At batch 1 the kernel stores dbias
    # in the bias dtype and shape itself: no glue touches it. Two launches: dq, then dk / dv.
    q, k, v = (torch.randn(batch, 2, 20, 16, dtype=torch.float16, requires_grad=True)
               for _ in range(3))
    bias = torch.randn(1, 2, 20, 20, dtype=torch.float16, requires_grad=True)
    out = pyvit_ops.scaled_dot_product_attention(q, k, v, attn_bias=bias, backend="triton")
    _, report = count_fused_traffic(out.backward, torch.randn_like(out))
    assert report["launches"] == 2 and bias.grad is not None
    ops = report["glue"]["ops"]
    if batch == 1:
        assert "aten.to.dtype" not in ops and "aten.sum.dim_IntList" not in ops
        assert report["glue"]["read_bytes"] == report["glue"]["write_bytes"] == 0, ops
        return
    cast = ops["aten.to.dtype"]
    assert cast["read_bytes"] == 2 * 20 * 20 * 4 and cast["write_bytes"] == 2 * 20 * 20 * 2


@pytest.mark.parametrize("packed", [True, False], ids=["qkvpacked", "three-slices"])
@pytest.mark.parametrize("op", ["window_attention", "window_attention_v2",
                                "scaled_dot_product_attention"])
def test_packed_entry_points_write_the_qkv_gradient_in_place(op, packed):
    # Through the three slices of one projection, autograd stacks dq, dk, dv into the
    # projection's gradient (a copy of all of it); the packed entry points' kernels write
    # it in place, so their backward has no glue of that size (Swin V2's cosine attention
    # too).
    heads, D = 2, 16
    if op.startswith("window_attention"):
        qkv = torch.randn(1, 7, 7, 3, heads, D, dtype=torch.float16, requires_grad=True)
        kwargs = dict(window_size=7, backend="triton")
        if op == "window_attention_v2":
            kwargs["logit_scale"] = torch.full((heads,), 2.3, requires_grad=True)
        fn = pyvit_ops.window_attention_qkvpacked if packed else \
            (lambda t, **kw: pyvit_ops.window_attention(*t.unbind(3), **kw))
    else:
        qkv = torch.randn(1, 20, 3, heads, D, dtype=torch.float16, requires_grad=True)
        kwargs = dict(backend="triton")
        fn = pyvit_ops.scaled_dot_product_attention_qkvpacked if packed else \
            (lambda t, **kw: pyvit_ops.scaled_dot_product_attention(
                *t.permute(2, 0, 3, 1, 4).unbind(0), **kw))
    out = fn(qkv, **kwargs)
    _, report = count_fused_traffic(out.backward, torch.randn_like(out))
    glue = report["glue"]["total_bytes"]
    if packed:
        assert glue < qkv.numel() * qkv.element_size() / 4, report["glue"]["ops"]
    else:
        assert "aten.stack.default" in report["glue"]["ops"]
        assert glue >= 2 * qkv.numel() * qkv.element_size()
