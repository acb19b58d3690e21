"""elsa_attention: reference vs the official unfold formulation, Triton (interpreter)
vs reference (forward and every gradient), determinism, nn.ELSA vs the official
module math and checkpoints, bad input."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyvit_ops.ops.elsa_attention as ops
from pyvit_ops import _backend
from pyvit_ops.kernels import elsa_attention as kernels
from pyvit_ops.nn.elsa import ELSA
from pyvit_ops.reference.elsa_attention import elsa_attention as reference

GHOSTS = ["none", "mul", "add", "both"]


# --------------------------------------------------------------------------- official math


def _official_elsa_op(features, channel_mul, channel_add, spatial_filter, kernel_size, dilation):
    """The official ``elsa_op`` CPU path (unfold): features (N, C, H, W), per-sample
    ghost tensors (N, C, K, K), probabilities (N, K*K, H, W)."""
    N, C, H, W = features.shape
    taps = kernel_size ** 2
    cols = F.unfold(features, kernel_size, dilation=dilation, padding=kernel_size // 2 * dilation)
    cols = cols.reshape(N, C, taps, H * W)
    filters = (channel_mul.reshape(N, C, taps, 1) * spatial_filter.reshape(N, 1, taps, H * W)
               + channel_add.reshape(N, C, taps, 1))
    return (cols * filters).sum(2).reshape(N, C, H, W)


def _official_aggregate(v, attn, ghost_mul, ghost_add, K, dilation, apply_softmax):
    """Steps 4-6 as the official module runs them: heads folded into the batch,
    softmax over dim 1, ghost tensors expanded per sample, ones / zeros when absent."""
    B, C, H, W = v.shape
    G = attn.shape[1] // (K * K)
    a = attn.reshape(B * G, K * K, H, W)
    if apply_softmax:
        a = a.softmax(1)

    def per_sample(ghost, fill):
        if ghost is None:
            return torch.full((B * G, C // G, K, K), fill, dtype=v.dtype)
        return ghost.expand(B, C, K, K).reshape(B * G, C // G, K, K)

    out = _official_elsa_op(v.reshape(B * G, C // G, H, W), per_sample(ghost_mul, 1.0),
                            per_sample(ghost_add, 0.0), a, K, dilation)
    return out.reshape(B, C, H, W)


def _inputs(B, C, G, H, W, K, ghost, dtype=torch.float64, probs=False, channels_last=False):
    v = torch.randn(B, C, H, W, dtype=dtype)
    attn = torch.randn(B, G * K * K, H, W, dtype=dtype) * 2
    if probs:
        attn = attn.reshape(B, G, K * K, H, W).softmax(2).reshape(B, -1, H, W)
    if channels_last:
        v = v.contiguous(memory_format=torch.channels_last)
        attn = attn.contiguous(memory_format=torch.channels_last)
    mul = torch.randn(C, K, K, dtype=dtype) if ghost in ("mul", "both") else None
    add = torch.randn(C, K, K, dtype=dtype) if ghost in ("add", "both") else None
    return v, attn, mul, add


# --------------------------------------------------------------------------- reference


# (B, C, G, H, W, K, dilation): grids smaller than the window, odd sizes, dilation.
REF_SHAPES = [
    (2, 6, 2, 13, 9, 3, 1),
    (1, 4, 1, 3, 5, 7, 1),     # 3x5 grid inside a 7x7 window: every tap set at the border
    (2, 6, 3, 7, 6, 5, 2),
    (1, 8, 2, 4, 9, 3, 2),
]


@pytest.mark.parametrize("shape", REF_SHAPES)
@pytest.mark.parametrize("ghost", GHOSTS)
@pytest.mark.parametrize("probs", [False, True])
def test_reference_matches_official_unfold(shape, ghost, probs):
    B, C, G, H, W, K, d = shape
    v, attn, mul, add = _inputs(B, C, G, H, W, K, ghost, probs=probs)
    out = reference(v, attn, mul, add, kernel_size=K, dilation=d, apply_softmax=not probs)
    expected = _official_aggregate(v, attn, mul, add, K, d, apply_softmax=not probs)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_half_inputs_computed_in_fp32(dtype):
    v, attn, mul, add = _inputs(1, 6, 2, 5, 6, 3, "both", dtype=dtype)
    out = reference(v, attn, mul, add, kernel_size=3)
    assert out.dtype == dtype
    exact = _official_aggregate(*(t.double() for t in (v, attn, mul, add)), 3, 1, True)
    # One rounding of the result only: within an ulp of the output dtype.
    torch.testing.assert_close(out.double(), exact, atol=1e-5, rtol=torch.finfo(dtype).eps)


def test_reference_keeps_channels_last():
    v, attn, mul, add = _inputs(1, 4, 2, 5, 6, 3, "both", channels_last=True)
    assert reference(v, attn, mul, add, kernel_size=3).is_contiguous(
        memory_format=torch.channels_last)


@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("probs", [False, True])
def test_reference_gradcheck(dilation, probs):
    v, attn, mul, add = _inputs(1, 4, 2, 3, 4, 3, "both", probs=probs)
    args = [t.requires_grad_() for t in (v, attn, mul, add)]
    assert torch.autograd.gradcheck(
        lambda *a: reference(*a, kernel_size=3, dilation=dilation, apply_softmax=not probs), args,
        fast_mode=True)


# --------------------------------------------------------------------------- Triton


def _assert_close(actual, expected, atol, rtol, name):
    """atol is relative to the largest expected magnitude, so one tolerance per
    dtype fits outputs and gradients of any scale."""
    scale = max(expected.abs().max().item(), 1e-6)
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")


def _run(fn, v, attn, mul, add, dout, **kw):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None
              for t in (v, attn, mul, add)]
    out = fn(*leaves, **kw)
    out.backward(dout)
    return out, [t.grad if t is not None else None for t in leaves]


# (dtype, atol relative to max |expected|, rtol): fp32 differs only by summation
# order; fp16 / bf16 by the rounding of the result (and of dattn's intermediate).
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}

# (dtype, B, C, G, H, W, K, dilation, ghost, channels_last, probs)
TRITON_CASES = [
    (torch.float32, 1, 6, 2, 13, 9, 3, 1, "both", False, False),   # odd sizes, 3 channels / head
    (torch.float32, 1, 8, 2, 3, 5, 7, 1, "mul", True, False),      # 3x5 grid, 7x7 window
    (torch.float32, 1, 6, 3, 7, 6, 5, 2, "add", False, False),     # dilation 2
    (torch.float32, 2, 4, 2, 5, 4, 3, 1, "both", True, True),      # probabilities
    (torch.float16, 1, 8, 2, 6, 5, 7, 1, "both", False, False),
    (torch.float16, 1, 6, 2, 9, 5, 3, 2, "none", True, False),
    (torch.bfloat16, 1, 6, 2, 13, 9, 5, 1, "both", True, False),
    (torch.bfloat16, 1, 4, 1, 4, 6, 3, 2, "add", False, True),
    (torch.float32, 1, 64, 2, 4, 5, 3, 1, "both", False, False),   # 32-channel heads (ELSA-Swin)
    (torch.float16, 1, 64, 2, 5, 4, 3, 1, "add", True, False),
    (torch.float32, 1, 6, 2, 3, 5, 7, 2, "both", False, False),    # dilated window >> grid
    (torch.float16, 2, 6, 2, 7, 9, 5, 2, "mul", True, False),
    (torch.bfloat16, 1, 8, 2, 9, 6, 7, 2, "add", False, False),
    (torch.float32, 1, 10, 2, 11, 7, 7, 1, "both", True, False),   # 5 channels / head, CL masks
    (torch.float16, 1, 4, 2, 5, 6, 5, 1, "none", False, True),
]


@pytest.mark.parametrize("case", TRITON_CASES,
                         ids=lambda c: f"{str(c[0])[6:]}-B{c[1]}C{c[2]}G{c[3]}-{c[4]}x{c[5]}"
                         f"-k{c[6]}d{c[7]}-{c[8]}-{'cl' if c[9] else 'nchw'}"
                         f"{'-probs' if c[10] else ''}")
def test_triton_matches_reference(case):
    dtype, B, C, G, H, W, K, d, ghost, channels_last, probs = case
    atol, rtol = TOL[dtype]
    v, attn, mul, add = _inputs(B, C, G, H, W, K, ghost, dtype=torch.float32, probs=probs,
                                channels_last=channels_last)
    v, attn, mul, add = (t.to(dtype) if t is not None else None for t in (v, attn, mul, add))
    dout = torch.randn(B, C, H, W).to(dtype)
    kw = dict(kernel_size=K, dilation=d, apply_softmax=not probs)
    out, grads = _run(lambda *a, **k: ops.elsa_attention(*a, **k, backend="triton"),
                      v, attn, mul, add, dout, **kw)
    ref_out, ref_grads = _run(reference, v, attn, mul, add, dout, **kw)
    assert out.dtype == dtype
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    _assert_close(out, ref_out, atol, rtol, "out")
    for name, g, r in zip(("dv", "dattn", "dghost_mul", "dghost_add"), grads, ref_grads):
        assert (g is None) == (r is None), name
        if g is not None:
            assert g.dtype == r.dtype and g.shape == r.shape, name
            _assert_close(g, r, atol, rtol, name)


def test_triton_views_fp32_ghost_and_partial_grads():
    """v and attn as strided slices of larger projections (read in place), fp32
    ghost tensors with fp16 data (AMP), and only some gradients requested."""
    B, C, G, H, W, K = 1, 8, 2, 5, 6, 3
    qkv = torch.randn(B, H, W, 3 * C).to(torch.float16).permute(0, 3, 1, 2)   # channels_last
    v = qkv[:, 2 * C:]
    big = torch.randn(B, 2 * G * K * K, H, W).to(torch.float16)
    attn = big[:, 1::2]                                                         # no unit stride
    mul, add = torch.randn(C, K, K), torch.randn(C, K, K)
    v_ref, attn_ref = v.detach().clone().requires_grad_(), attn.detach().clone()
    mul_ref = mul.clone().requires_grad_()
    v.requires_grad_()
    mul.requires_grad_()
    out = ops.elsa_attention(v, attn, mul, add, kernel_size=K, backend="triton")
    ref = reference(v_ref, attn_ref, mul_ref, add, kernel_size=K)
    atol, rtol = TOL[torch.float16]
    _assert_close(out, ref, atol, rtol, "out")
    dout = torch.randn_like(ref)
    out.backward(dout)
    ref.backward(dout)
    _assert_close(v.grad, v_ref.grad, atol, rtol, "dv")
    assert mul.grad.dtype == torch.float32
    _assert_close(mul.grad, mul_ref.grad, atol, rtol, "dghost_mul")


@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_backward_deterministic_with_batch_chunks(monkeypatch, channels_last):
    """Two backward runs are bitwise equal; with one program per (tile, head) the
    attn-gradient kernel loops over all samples of the batch (dM / dD accumulated
    over the chunk), which must still match the reference."""
    monkeypatch.setattr(kernels, "_TARGET_PROGRAMS", 1)
    B, C, G, H, W, K = 3, 4, 2, 5, 6, 3
    v, attn, mul, add = _inputs(B, C, G, H, W, K, "both", dtype=torch.float32,
                                channels_last=channels_last)
    dout = torch.randn(B, C, H, W)
    args = (dout, v, attn, mul, add, K, 1, True, (True, True, True, True))
    first, second = kernels.elsa_attention_bwd(*args), kernels.elsa_attention_bwd(*args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    _, ref_grads = _run(reference, v, attn, mul, add, dout, kernel_size=K)
    for name, g, r in zip(("dv", "dattn", "dghost_mul", "dghost_add"), first, ref_grads):
        _assert_close(g, r, 1e-5, 1e-5, name)


def test_triton_dattn_precise_when_taps_agree():
    """Nearly constant v makes every tap's dp almost equal, so dl = p * (dp - mean)
    is a small difference of large numbers. The kernel stores dp relative to the
    centre tap in fp16, so its error stays at the rounding of dl itself."""
    B, C, H, W, K = 1, 8, 5, 6, 3
    v = (1 + 1e-3 * torch.randn(B, C, H, W)).half()
    attn = torch.randn(B, K * K, H, W).half()
    dout = torch.randn(B, C, H, W).half()
    _, (dv, dattn, _, _) = _run(lambda *a, **k: ops.elsa_attention(*a, **k, backend="triton"),
                                v, attn, None, None, dout, kernel_size=K)
    _, (_, exact, _, _) = _run(reference, v.double(), attn.double(), None, None, dout.double(),
                               kernel_size=K)
    # Inside the border every tap is in the image and dl ~ 1e-3 |dp|: storing plain
    # fp16 dp would be off by ~15% of max |dl| there.
    inner = (..., slice(K // 2, -(K // 2)), slice(K // 2, -(K // 2)))
    _assert_close(dattn[inner], exact[inner], 2e-3, 2e-3, "dattn")


def test_triton_opcheck():
    v, attn, mul, add = _inputs(1, 4, 2, 3, 4, 3, "both", dtype=torch.float32)
    torch.library.opcheck(torch.ops.pyvit_ops.elsa_attention_fwd.default,
                          (v, attn, mul, add, 3, 1, True, "triton"))
    torch.library.opcheck(torch.ops.pyvit_ops.elsa_attention_bwd.default,
                          (torch.randn_like(v), v, attn, mul, add, 3, 1, True,
                           [True, True, True, True], "triton"))


def test_tile_config_fits_elsa_swin():
    # channels_last: the most pixels (<= 1K elements) padding H*W by at most 1/8.
    assert kernels.tile_config(32, 56 * 56, 7, True).block_p == 32   # 98 tiles, no padding
    assert kernels.tile_config(32, 28 * 28, 7, True).block_p == 32   # 784 -> 800
    assert kernels.tile_config(32, 14 * 14, 7, True).block_p == 16   # 196 -> 208
    assert kernels.tile_config(32, 56 * 56, 7, False) == kernels.TileConfig(32, 32, 4, 16, 16)


def test_static_compile_specs_cover_every_tile():
    specs = kernels.static_compile_specs()
    names = {s["name"] for s in specs}
    assert len(names) == len(specs)
    for channels_last, cfg in kernels._spec_tiles():
        for key, kernel in kernels._KERNELS.items():
            block_p = cfg.block_p_attn if key == "bwd_attn" else cfg.block_p
            stem = (f"{kernel.__name__}_{'cl' if channels_last else 'nchw'}"
                    f"_c{cfg.block_c}p{block_p}_k7_")
            assert {f"{stem}{dt}" for dt in ("fp16", "bf16", "fp32")} <= names


# --------------------------------------------------------------------------- nn.ELSA


def _official_forward(m, x, attn_dropout=None):
    """The official ELSA.forward math on the module's parameters (stride 1)."""
    B, H, W, _ = x.shape
    C, K, G = m.dim_v, m.kernel_size, m.num_heads
    qkv = F.conv2d(x.permute(0, 3, 1, 2), m.pre_proj.weight, m.pre_proj.bias)
    q, k, v = torch.split(qkv, (m.dim_qk, m.dim_qk, C), dim=1)
    quadratic = q * k * m.scale
    conv0, conv2 = m.attn[0], m.attn[2]
    attn = F.conv2d(quadratic, conv0.weight, conv0.bias, padding=K // 2 * m.dilation,
                    dilation=m.dilation, groups=conv0.groups)
    attn = F.conv2d(F.gelu(attn), conv2.weight, conv2.bias, groups=conv2.groups)
    attn = attn.reshape(B * G, -1, H, W).softmax(1)
    if attn_dropout is not None:
        attn = attn_dropout(attn)
    if m.lam != 0 and m.gamma != 0:
        gh = m.ghost_head.expand(2, B, C, K, K).reshape(2, B * G, C // G, K, K)
        mul, add = gh[0] ** m.lam, gh[1] * m.gamma
    elif m.lam == 0 and m.gamma != 0:
        mul = torch.ones(B * G, C // G, K, K, dtype=x.dtype)
        add = m.ghost_head.expand(B, C, K, K).reshape(B * G, C // G, K, K) * m.gamma
    elif m.lam != 0 and m.gamma == 0:
        mul = m.ghost_head.expand(B, C, K, K).reshape(B * G, C // G, K, K) ** m.lam
        add = torch.zeros(B * G, C // G, K, K, dtype=x.dtype)
    else:
        mul = torch.ones(B * G, C // G, K, K, dtype=x.dtype)
        add = torch.zeros(B * G, C // G, K, K, dtype=x.dtype)
    y = _official_elsa_op(v.reshape(B * G, C // G, H, W), mul, add, attn, K, m.dilation)
    y = y.reshape(B, C, H, W).permute(0, 2, 3, 1)
    return F.linear(y, m.post_proj.weight, m.post_proj.bias)


def _official_state_dict(dim, heads, dim_qk, K, lam, gamma, qkv_bias, groups=1):
    """A checkpoint with the official parameter names and shapes."""
    sd = {"pre_proj.weight": torch.randn(2 * dim_qk + dim, dim, 1, 1, dtype=torch.float64),
          "attn.0.weight": torch.randn(dim_qk, 8, K, K, dtype=torch.float64) * 0.2,
          "attn.0.bias": torch.randn(dim_qk, dtype=torch.float64),
          "attn.2.weight": torch.randn(K * K * heads, dim_qk // groups, 1, 1, dtype=torch.float64),
          "attn.2.bias": torch.randn(K * K * heads, dtype=torch.float64),
          "post_proj.weight": torch.randn(dim, dim, dtype=torch.float64),
          "post_proj.bias": torch.randn(dim, dtype=torch.float64)}
    if qkv_bias:
        sd["pre_proj.bias"] = torch.randn(2 * dim_qk + dim, dtype=torch.float64)
    if lam != 0 and gamma != 0:
        sd["ghost_head"] = torch.randn(2, 1, dim, K, K, dtype=torch.float64)
    elif lam != 0 or gamma != 0:
        sd["ghost_head"] = torch.randn(1, dim, K, K, dtype=torch.float64)
    return sd


# (lam, gamma): both ghost parts, add only (ELSA-Swin), mul only, none, non-unit values.
LAM_GAMMA = [(1, 1), (0, 1), (1, 0), (0, 0), (2, 0.5)]


@pytest.mark.parametrize("lam,gamma", LAM_GAMMA)
def test_module_loads_official_checkpoint_and_matches_official_math(lam, gamma):
    dim, heads, K = 12, 3, 5   # dim_qk = 8 (12 // 3 * 2), 4 channels per head
    m = ELSA(dim, heads, kernel_size=K, lam=lam, gamma=gamma, qkv_bias=lam == 1).double()
    assert m.dim_qk == 8
    sd = _official_state_dict(dim, heads, 8, K, lam, gamma, qkv_bias=lam == 1)
    m.load_state_dict(sd, strict=True)
    x = torch.randn(2, 6, 7, dim, dtype=torch.float64)
    torch.testing.assert_close(m(x), _official_forward(m, x), atol=1e-10, rtol=1e-10)


def test_module_dim_qk_rounding_scale_and_stride():
    m = ELSA(20, 2, group_width=8)
    assert m.dim_qk == 16 and m.scale == 10 ** -0.5          # 20 // 3 * 2 = 12 -> 16
    assert ELSA(16, 2, qk_scale=1).scale == 1
    with pytest.raises(ValueError, match="stride"):
        ELSA(16, 2, stride=2)


def test_module_attention_dropout_in_training():
    class FixedDrop(nn.Module):
        """Dropout with a fixed mask, so both paths drop the same taps."""
        p = 0.5

        def __init__(self, mask):
            super().__init__()
            self.mask = mask

        def forward(self, a):
            return a * self.mask.reshape(a.shape) / (1 - self.p)

    dim, heads, K, B, H, W = 8, 2, 3, 2, 4, 5
    m = ELSA(dim, heads, kernel_size=K, attn_drop=0.5, lam=1, gamma=1).double()
    x = torch.randn(B, H, W, dim, dtype=torch.float64)
    m.attn_drop = FixedDrop(torch.rand(B * heads, K * K, H, W) > 0.5)
    m.train()
    torch.testing.assert_close(m(x), _official_forward(m, x, m.attn_drop), atol=1e-10, rtol=1e-10)
    m.eval()   # no dropout: the fused softmax path
    torch.testing.assert_close(m(x), _official_forward(m, x), atol=1e-10, rtol=1e-10)


def test_module_triton_matches_reference_module():
    """Through the real module: v is a channels_last slice of pre_proj's output and
    the logits are channels_last; ELSA-Swin's lambda = 0."""
    dim, heads, K = 16, 2, 3
    ref = ELSA(dim, heads, kernel_size=K, lam=0, gamma=1, qk_scale=1)
    tri = ELSA(dim, heads, kernel_size=K, lam=0, gamma=1, qk_scale=1, backend="triton")
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(1, 5, 4, dim)
    out_ref, out_tri = ref(x), tri(x)
    _assert_close(out_tri, out_ref, 1e-5, 1e-5, "out")
    dout = torch.randn_like(out_ref)
    out_ref.backward(dout)
    out_tri.backward(dout)
    for (name, p_ref), p_tri in zip(ref.named_parameters(), tri.parameters()):
        _assert_close(p_tri.grad, p_ref.grad, 1e-5, 1e-4, name)


# --------------------------------------------------------------------------- errors


def _good():
    v, attn, mul, add = _inputs(1, 6, 2, 4, 5, 3, "both", dtype=torch.float32)
    return dict(v=v, attn=attn, ghost_mul=mul, ghost_add=add)


@pytest.mark.parametrize("change,error,match", [
    (dict(kernel_size=4), ValueError, "kernel_size: expected an odd"),
    (dict(kernel_size=3.0), TypeError, "kernel_size: expected an int"),
    (dict(dilation=0), ValueError, "dilation: expected an int >= 1"),
    (dict(attn=torch.randn(1, 17, 4, 5)), ValueError, "attn: expected G \\* kernel_size"),
    (dict(attn=torch.randn(1, 36, 4, 5)), ValueError, "v: expected a channel count divisible"),
    (dict(attn=torch.randn(1, 18, 4, 6)), ValueError, "attn: expected shape \\(1, 18, 4, 5\\)"),
    (dict(attn=torch.randn(2, 18, 4, 5)), ValueError, "attn: expected shape"),
    (dict(ghost_mul=torch.randn(6, 3, 4)), ValueError, "ghost_mul: expected shape \\(6, 3, 3\\)"),
    (dict(ghost_add=torch.randn(3, 3, 3)), ValueError, "ghost_add: expected shape"),
    (dict(ghost_add=torch.randn(6, 3, 3, dtype=torch.float16)), TypeError, "ghost_add: expected dtype"),
    (dict(attn=torch.randn(1, 18, 4, 5, dtype=torch.float16)), TypeError, "attn: expected dtype"),
    (dict(v=torch.randn(6, 4, 5)), ValueError, "v: expected a 4-D tensor"),
    (dict(v=[[1.0]]), TypeError, "v: expected a torch.Tensor"),
    (dict(ghost_mul=torch.randn(6, 3, 3, device="meta")), ValueError, "ghost_mul: expected device"),
    (dict(apply_softmax=1), TypeError, "apply_softmax: expected a bool"),
])
def test_bad_input(change, error, match):
    args = {**_good(), "kernel_size": 3, **change}
    with pytest.raises(error, match=match):
        ops.elsa_attention(args.pop("v"), args.pop("attn"), **args)


def test_stride_is_not_an_argument():
    with pytest.raises(TypeError, match="stride"):
        ops.elsa_attention(**_good(), kernel_size=3, stride=2)


def test_forced_backends_list_their_reasons():
    v, attn, _, _ = _inputs(1, 258, 2, 3, 3, 3, "none", dtype=torch.float32)
    with pytest.raises(_backend.BackendUnavailableError, match="129 channels per head > 128"):
        ops.elsa_attention(v, attn, kernel_size=3, backend="triton")
    v, attn, _, _ = _inputs(1, 2, 1, 3, 3, 15, "none", dtype=torch.float32)
    with pytest.raises(_backend.BackendUnavailableError, match="kernel_size 15 > 13"):
        ops.elsa_attention(v, attn, kernel_size=15, backend="cuda")
