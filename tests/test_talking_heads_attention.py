"""talking_heads_attention: the reference against timm's CaiT ``TalkingHeadAttn``
arithmetic and gradcheck; the Triton kernels (in the interpreter) against the float64
reference, forward and every gradient, in each dtype, at token counts that are not
multiples of the tiles and on timm's strided views of one qkv projection; parameters
in float32 under half inputs; determinism; opcheck; backend choice and bad input; the
kernels' constants against the declared limits."""
import itertools

import pytest
import torch

import pyvit_ops
from pyvit_ops import _backend, capabilities
from pyvit_ops.kernels import talking_heads_attention as kernels
from pyvit_ops.reference.talking_heads_attention import talking_heads_attention as reference
from pyvit_ops.testing.specs import talking_heads_attention as static_specs
from op_cases import GridRecorder
from tolerance import assert_within

NAMES = ("out", "q", "k", "v", "proj_l_weight", "proj_l_bias", "proj_w_weight", "proj_w_bias")


def _inputs(B, H, N, D, dtype=torch.float64, param_dtype=None, packed=True, seed=0):
    """q, k, v (B, H, N, D) in ``dtype``, as timm's views of one (B, N, 3, H, D)
    projection when ``packed``; the head mixes' weights near timm's init (identity-ish
    mixes plus noise) in ``param_dtype`` (default ``dtype``); dout. All leaves."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * std

    if packed:
        qkv = randn(B, N, 3, H, D).to(dtype).requires_grad_()
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        tokens = [qkv]
    else:
        tokens = [randn(B, H, N, D).to(dtype).requires_grad_() for _ in range(3)]
        q, k, v = tokens
    pd = param_dtype or dtype
    params = [(torch.eye(H, dtype=torch.float64) + randn(H, H, std=0.5)).to(pd),
              randn(H, std=0.5).to(pd),
              (torch.eye(H, dtype=torch.float64) + randn(H, H, std=0.5)).to(pd),
              randn(H, std=0.1).to(pd)]
    params = [p.requires_grad_() for p in params]
    dout = randn(B, H, N, D).to(dtype)
    return tokens, (q, k, v), params, dout


def _timm_talking_heads(q, k, v, L, bl, W, bw, scale):
    """timm.models.cait.TalkingHeadAttn.forward between its qkv and output projections."""
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = (attn.permute(0, 2, 3, 1) @ L.t() + bl).permute(0, 3, 1, 2)
    attn = attn.softmax(dim=-1)
    attn = (attn.permute(0, 2, 3, 1) @ W.t() + bw).permute(0, 3, 1, 2)
    return attn @ v


def _run(backend, tokens, qkv, params, dout, scale):
    """The output and the gradients of q, k, v and the parameters."""
    out = pyvit_ops.talking_heads_attention(*qkv, *params, scale=scale, backend=backend)
    grads = torch.autograd.grad(out, [*qkv, *params], dout)
    return dict(zip(NAMES, (out, *grads)))


# --------------------------------------------------------------------------- reference


def test_reference_is_timms_arithmetic():
    _, qkv, params, _ = _inputs(2, 3, 7, 5)
    torch.testing.assert_close(reference(*qkv, *params, scale=0.4),
                               _timm_talking_heads(*qkv, *params, 0.4), rtol=1e-12, atol=1e-12)


def test_reference_gradcheck():
    _, qkv, params, _ = _inputs(1, 2, 4, 3, packed=False)
    assert torch.autograd.gradcheck(
        lambda *args: reference(*args, scale=0.7), (*qkv, *params))


def test_reference_half_inputs_computed_in_fp32():
    _, qkv, params, _ = _inputs(1, 2, 6, 4, dtype=torch.float16, param_dtype=torch.float32)
    out = reference(*qkv, *params, scale=0.5)
    assert out.dtype == torch.float16
    exact = reference(*(t.double() for t in (*qkv, *params)), scale=0.5)
    torch.testing.assert_close(out.double(), exact, atol=1e-3, rtol=2 ** -10)


# --------------------------------------------------------------------------- kernels

# (B, H, N, D): N below, at and past the 16-token tiles; H not a power of two.
SHAPES = [(2, 2, 5, 8), (1, 3, 21, 12), (1, 4, 40, 16)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}N{}D{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_matches_reference(shape, dtype):
    B, H, N, D = shape
    scale = D ** -0.5
    tokens, qkv, params, dout = _inputs(*shape, dtype=dtype, packed=N != 21)
    got = _run("triton", tokens, qkv, params, dout, scale)
    own = _run("reference", tokens, qkv, params, dout, scale)
    exact = _run("reference", None, [t.detach().double().requires_grad_() for t in qkv],
                 [p.detach().double().requires_grad_() for p in params], dout.double(), scale)
    for name in NAMES:
        assert_within(name, got[name], exact[name], own[name], dtype)
    assert torch.count_nonzero(got["proj_l_bias"]) == 0  # softmax is shift-invariant


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_float32_parameters_with_half_inputs(dtype):
    """A half model under autocast: float32 head mixes, read as they are, their
    gradients in float32."""
    shape = (1, 3, 18, 8)
    tokens, qkv, params, dout = _inputs(*shape, dtype=dtype, param_dtype=torch.float32)
    got = _run("triton", tokens, qkv, params, dout, 0.3)
    own = _run("reference", tokens, qkv, params, dout, 0.3)
    exact = _run("reference", None, [t.detach().double().requires_grad_() for t in qkv],
                 [p.detach().double().requires_grad_() for p in params], dout.double(), 0.3)
    for name in NAMES:
        assert got[name].dtype == (torch.float32 if name.startswith("proj") else dtype)
        assert_within(name, got[name], exact[name], own[name], dtype)


def test_backward_deterministic():
    """Two backward runs are bitwise equal (the parameter gradients are partial sums of
    several programs: 3 key blocks x 2 images)."""
    tokens, qkv, params, dout = _inputs(2, 2, 33, 8, dtype=torch.float32)
    first = _run("triton", tokens, qkv, params, dout, 0.5)
    second = _run("triton", tokens, qkv, params, dout, 0.5)
    for name in NAMES:
        assert torch.equal(first[name], second[name]), name


def test_opcheck():
    """Schema, fake tensors and autograd registration agree with the kernels."""
    _, qkv, params, dout = _inputs(1, 2, 5, 8, dtype=torch.float32, packed=False)
    args = [t.detach() for t in (*qkv, *params)]
    torch.library.opcheck(torch.ops.pyvit_ops.talking_heads_attention_fwd.default,
                          (*[t.clone().requires_grad_() for t in args], 0.5))
    _, stats = torch.ops.pyvit_ops.talking_heads_attention_fwd(*args, 0.5)
    torch.library.opcheck(torch.ops.pyvit_ops.talking_heads_attention_bwd.default,
                          (dout, *args, stats, 0.5))


def test_one_program_per_batch_and_block(monkeypatch):
    """The launch grids: (batch x query blocks) forward and dq, (batch x key blocks)
    dk and dv."""
    grids = []
    for name in ("_talking_heads_attention_fwd_kernel", "_talking_heads_attention_bwd_dq_kernel",
                 "_talking_heads_attention_bwd_dk_kernel",
                 "_talking_heads_attention_bwd_dv_kernel"):
        monkeypatch.setattr(kernels, name, GridRecorder(grids))
    _, qkv, params, dout = _inputs(3, 8, 577, 48, dtype=torch.float16)
    args = [t.detach() for t in (*qkv, *params)]
    _, stats = kernels.talking_heads_attention_fwd(*args, 0.5)
    kernels.talking_heads_attention_bwd(dout, *args, stats, 0.5)
    blocks = 3 * -(-577 // 16)
    assert grids == [(blocks,)] * 4


# --------------------------------------------------------------------------- choice, input


def test_backend_choice():
    _, qkv, params, _ = _inputs(1, 2, 5, 8, dtype=torch.float32)
    with pytest.raises(_backend.BackendUnavailableError, match="no cuda kernels"):
        pyvit_ops.talking_heads_attention(*qkv, *params, scale=0.5, backend="cuda")
    _, qkv, params, _ = _inputs(1, 9, 2, 8, dtype=torch.float16)
    with pytest.raises(_backend.BackendUnavailableError, match="heads 9 > 8"):
        pyvit_ops.talking_heads_attention(*qkv, *params, scale=0.5, backend="triton")
    _, qkv, params, _ = _inputs(1, 5, 2, 8, dtype=torch.float32)
    with pytest.raises(_backend.BackendUnavailableError, match="float32 heads 5 > 4"):
        pyvit_ops.talking_heads_attention(*qkv, *params, scale=0.5, backend="triton")
    # CPU tensors: the reference, automatically.
    out = pyvit_ops.talking_heads_attention(*qkv, *params, scale=0.5)
    torch.testing.assert_close(out, reference(*qkv, *params, scale=0.5))


def _bad(**change):
    _, (q, k, v), params, _ = _inputs(1, 2, 5, 8, dtype=torch.float32, packed=False)
    args = dict(q=q, k=k, v=v, proj_l_weight=params[0], proj_l_bias=params[1],
                proj_w_weight=params[2], proj_w_bias=params[3], scale=0.5)
    args.update(change)
    return lambda: pyvit_ops.talking_heads_attention(**args)


@pytest.mark.parametrize("call, error, text", [
    (_bad(q=torch.zeros(2, 5, 8)), ValueError, "q: expected a 4-D tensor"),
    (_bad(k=torch.zeros(1, 2, 6, 8)), ValueError, "k: expected shape (1, 2, 5, 8)"),
    (_bad(v=torch.zeros(1, 2, 5, 8, dtype=torch.float16)), TypeError, "dtype"),
    (_bad(proj_l_weight=torch.zeros(2, 3)), ValueError, "proj_l_weight: expected shape (2, 2)"),
    (_bad(proj_w_bias=torch.zeros(3)), ValueError, "proj_w_bias: expected shape (2,)"),
    (_bad(proj_w_weight=[[1.0]]), TypeError, "proj_w_weight: expected a torch.Tensor"),
    (_bad(scale=None), TypeError, "scale: expected a float"),
    (_bad(scale=float("nan")), ValueError, "scale: expected a finite float"),
    (_bad(q=torch.zeros(1, 0, 5, 8)), ValueError, "q: expected (B, heads, N, D)"),
], ids=["q-3d", "k-shape", "v-dtype", "l-shape", "bw-shape", "w-list", "scale-none",
        "scale-nan", "no-heads"])
def test_bad_input(call, error, text):
    with pytest.raises(error) as info:
        call()
    assert text in str(info.value)


# --------------------------------------------------------------------------- limits


def test_kernel_constants_are_the_declared_limits():
    declared = capabilities.capability("talking_heads_attention", "triton")
    assert kernels.MAX_HEADS == declared.limit("heads").value
    assert kernels.MAX_HEADS_FP32 == declared.limit("float32_heads").value
    assert kernels.MAX_HEAD_DIM == declared.limit("head_dim").value
    assert capabilities.declared_backends("talking_heads_attention") == ("reference", "triton")


def test_static_specs_cover_every_launch_config():
    """Every (padded heads, padded head dim) the launchers pick has a spec per kernel
    and dtype, with the launchers' tiles."""
    names = {s["name"] for s in static_specs.static_compile_specs()}
    for dtype, max_heads in (("fp16", kernels.MAX_HEADS), ("bf16", kernels.MAX_HEADS),
                             ("fp32", kernels.MAX_HEADS_FP32)):
        for H, D in itertools.product(range(1, max_heads + 1),
                                      range(1, kernels.MAX_HEAD_DIM + 1)):
            block_h, block_d = kernels._blocks(H, D)
            cfg = kernels.tile_config(block_h)
            for key in ("fwd", "bwd_dq", "bwd_dk", "bwd_dv"):
                assert (f"talking_heads_{key}_h{block_h}d{block_d}m{cfg.block_m}"
                        f"n{cfg.block_n}w{cfg.num_warps}_{dtype}") in names


# --------------------------------------------------------------------------- module


def _timm_module(**kwargs):
    from timm.models.cait import TalkingHeadAttn

    torch.manual_seed(0)
    module = TalkingHeadAttn(32, num_heads=4, qkv_bias=True, **kwargs).double()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    return module


def test_module_matches_timm():
    """from_timm shares timm's parameters; a constructed module loads timm's state_dict."""
    pytest.importorskip("timm")
    timm_mod = _timm_module()
    ours = pyvit_ops.nn.TalkingHeadsAttention.from_timm(timm_mod, backend="reference")
    assert {id(p) for p in ours.parameters()} == {id(p) for p in timm_mod.parameters()}
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    torch.testing.assert_close(ours(x), timm_mod(x), rtol=1e-12, atol=1e-12)
    built = pyvit_ops.nn.TalkingHeadsAttention(32, num_heads=4, qkv_bias=True).double()
    built.load_state_dict(timm_mod.state_dict())
    torch.testing.assert_close(built(x), timm_mod(x), rtol=1e-12, atol=1e-12)


def test_module_attention_dropout_is_timms():
    """In training with attn_drop > 0 the module runs timm's arithmetic: the same dropout
    draws for the same seed."""
    pytest.importorskip("timm")
    timm_mod = _timm_module(attn_drop=0.3).train()
    ours = pyvit_ops.nn.TalkingHeadsAttention.from_timm(timm_mod, backend="triton")
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    torch.manual_seed(1)
    expected = timm_mod(x)
    torch.manual_seed(1)
    torch.testing.assert_close(ours(x), expected, rtol=1e-12, atol=1e-12)


def test_module_rejects_bad_input():
    with pytest.raises(ValueError, match="num_heads: must divide dim=10"):
        pyvit_ops.nn.TalkingHeadsAttention(10, num_heads=4)
    with pytest.raises(TypeError, match="module: expected a timm TalkingHeadAttn"):
        pyvit_ops.nn.TalkingHeadsAttention.from_timm(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="x: expected shape"):
        pyvit_ops.nn.TalkingHeadsAttention(8, 2)(torch.randn(2, 5, 4))
