"""The declared capabilities (pyvit_ops.capabilities) against what they describe: the
limits the CUDA builds export and the Triton kernel modules' constants; every limit
gives a backend reason just past it and none at it; the README's support matrix and
``python -m pyvit_ops.info`` show the declarations."""
import contextlib
import io
import json
import pathlib

import pytest
import torch

from pyvit_ops import _backend, _ext, capabilities, info
from pyvit_ops.ops import avg_pool2d as pool_ops
from pyvit_ops.ops import elsa_attention as elsa_ops
from pyvit_ops.ops import scaled_dot_product_attention as sdpa_ops
from pyvit_ops.ops import talking_heads_attention as talking_heads_ops
from pyvit_ops.ops import window_attention as window_ops

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
MATRIX_START = "<!-- support matrix: generated from pyvit_ops/capabilities.py by " \
               "`python -m pyvit_ops.info --markdown` -->\n"
MATRIX_END = "<!-- end of support matrix -->\n"


@pytest.fixture(scope="module")
def host_ops():
    from pyvit_ops.testing import host

    return host.load()


# ----------------------------------------------------------------------------- extension

def test_host_build_exports_the_declared_limits(host_ops):
    exported = {name: int(getattr(host_ops, name)()) for name in _ext.LIMIT_OPS}
    assert exported == capabilities.exported_limits()
    assert _ext.limits(_ext.HOST_NAMESPACE) == capabilities.exported_limits()
    assert _ext.limits_reason(_ext.HOST_NAMESPACE) == ""


@pytest.mark.skipif(not _ext.HAS_CUDA_EXT, reason="the CUDA extension is not built")
def test_cuda_extension_exports_the_declared_limits():
    ops = torch.ops.pyvit_ops_cuda
    exported = {name: int(getattr(ops, name)()) for name in _ext.LIMIT_OPS if hasattr(ops, name)}
    assert exported == capabilities.exported_limits(), \
        "rebuild the extension: pip install --no-build-isolation -e ."
    assert _ext.limits_reason(_ext.CUDA_NAMESPACE) == ""


def test_every_cuda_limit_is_exported():
    names = {capabilities.export_name(op, limit) for (op, backend), cap
             in capabilities.CAPABILITIES.items() if backend == "cuda" for limit in cap.limits}
    assert names == set(_ext.LIMIT_OPS)
    assert "avg_pool2d_image_limit" in names


def test_a_build_with_other_limits_does_not_run(host_ops, monkeypatch):
    """A build compiled with other limits than the declared ones (stale sources) is
    skipped with a reason, not trusted to agree with the reasons."""
    declared = capabilities.exported_limits()
    other = dict(declared, window_attention_window_area_limit=49)
    monkeypatch.setattr(capabilities, "exported_limits", lambda: other)
    try:
        _ext.read_limits(_ext.HOST_NAMESPACE)
        ok, why = _ext.has_op("window_attention_fwd", "cpu")
        assert not ok
        assert "window_attention_window_area_limit: built 576, declared 49" in why
        assert "rebuild" in why
    finally:
        monkeypatch.undo()
        _ext.read_limits(_ext.HOST_NAMESPACE)
    assert _ext.has_op("window_attention_fwd", "cpu") == (True, "")


# ----------------------------------------------------------------------------- Triton modules

def test_triton_kernel_constants_equal_the_declared_limits():
    from pyvit_ops.kernels import elsa_attention as elsa_kernels
    from pyvit_ops.kernels import scaled_dot_product_attention as sdpa_kernels
    from pyvit_ops.kernels import window_attention as window_kernels

    def declared(op, name):
        return capabilities.capability(op, "triton").limit(name)

    assert sdpa_kernels.MAX_HEAD_DIM == declared("scaled_dot_product_attention", "head_dim").value
    assert window_kernels.MAX_HEAD_DIM == declared("window_attention", "head_dim").value
    area = declared("window_attention", "window_area").value
    assert window_kernels.MAX_WINDOW_AREA == area
    fp32 = declared("window_attention", "float32_head_dim")
    assert [window_kernels.max_head_dim_fp32(a) for a in range(1, area + 1)] == \
        [fp32.bound(a) for a in range(1, area + 1)]
    # The float32 step sits at the kernels' first window-area bucket.
    assert fp32.steps[0][0] == window_kernels._BLOCK_NS[0]
    assert elsa_kernels.MAX_HEAD_CHANNELS == declared("elsa_attention", "head_channels").value


def test_automatic_order_is_the_declared_one():
    assert tuple(_backend.PRIORITY) == capabilities.OPERATOR_NAMES
    for op in capabilities.OPERATORS:
        assert _backend.PRIORITY[op.name] == op.order
        assert sorted(op.order) == sorted(
            b for b in capabilities.declared_backends(op.name) if b != "reference")


# Operators without CUDA C++ kernels (the dispatcher never picks "cuda" for them).
NO_CUDA = {"talking_heads_attention"}


def test_every_operator_and_backend_is_declared():
    assert set(capabilities.CAPABILITIES) == {
        (op, b) for op in capabilities.OPERATOR_NAMES for b in capabilities.BACKENDS
        if not (b == "cuda" and op in NO_CUDA)}


# ----------------------------------------------------------------------------- reasons

def _t(*shape, dtype=torch.float16):
    # Sizes only, no memory: the reasons read shapes, strides and dtypes.
    return torch.zeros((), dtype=dtype).expand(shape)


def _sdpa_head_dim(backend, D, key):
    q = _t(1, 1, 4, D)
    return sdpa_ops._reasons(backend, q, q, q, None)


def _sdpa_batch_tokens(backend, n, key):
    q = _t(n, 1, 1, 8)
    return sdpa_ops._reasons(backend, q, q, q, None)


def _window(backend, D, area, dtype):
    q = _t(1, 1, area, 1, D, dtype=dtype)
    return window_ops._reasons(backend, q, q, q, None, None, (1, area))


def _window_head_dim(backend, D, key):
    return _window(backend, D, 4, torch.float16)


def _window_fp32_head_dim(backend, D, area):
    return _window(backend, D, area, torch.float32)


def _window_area(backend, area, key):
    return _window(backend, 8, area, torch.float16)


def _elsa(backend, channels, K):
    v, attn = _t(1, channels, 6, 6), _t(1, K * K, 6, 6)
    return elsa_ops._reasons(backend, v, attn, None, None, 1, K, 1)


def _elsa_head_channels(backend, channels, key):
    return _elsa(backend, channels, 3)


def _elsa_kernel_size(backend, K, key):
    return _elsa(backend, 8, K)


def _pool(backend, x_shape, out_shape):
    return pool_ops._reasons(backend, _t(*x_shape), torch.Size(out_shape))


def _pool_input_images(backend, n, key):
    return _pool(backend, (n, 1, 1, 1), (1, 1, 1, 1))


def _pool_input_elements(backend, n, key):
    return _pool(backend, (1, 1, n, 1), (1, 1, 1, 1))


def _pool_output_images(backend, n, key):
    return _pool(backend, (1, 1, 1, 1), (n, 1, 1, 1))


def _pool_output_elements(backend, n, key):
    return _pool(backend, (1, 1, 1, 1), (1, n, 1, 1))


def _talking_heads(backend, H, D, dtype=torch.float16):
    q, w, b = _t(1, H, 4, D, dtype=dtype), _t(H, H), _t(H)
    return talking_heads_ops._reasons(backend, q, q, q, (w, b, w, b))


def _talking_heads_heads(backend, H, key):
    return _talking_heads(backend, H, 16)


def _talking_heads_fp32_heads(backend, H, key):
    return _talking_heads(backend, H, 16, torch.float32)


def _talking_heads_head_dim(backend, D, key):
    return _talking_heads(backend, 4, D)


CALLS = {
    ("scaled_dot_product_attention", "head_dim"): [_sdpa_head_dim],
    ("scaled_dot_product_attention", "batch_tokens"): [_sdpa_batch_tokens],
    ("window_attention", "head_dim"): [_window_head_dim],
    ("window_attention", "float32_head_dim"): [_window_fp32_head_dim],
    ("window_attention", "window_area"): [_window_area],
    ("elsa_attention", "head_channels"): [_elsa_head_channels],
    ("elsa_attention", "kernel_size"): [_elsa_kernel_size],
    ("talking_heads_attention", "heads"): [_talking_heads_heads],
    ("talking_heads_attention", "float32_heads"): [_talking_heads_fp32_heads],
    ("talking_heads_attention", "head_dim"): [_talking_heads_head_dim],
    ("avg_pool2d", "image"): [_pool_input_images, _pool_input_elements, _pool_output_images,
                              _pool_output_elements],
}


def _limit_cases():
    """(op, backend, limit name, key, bound): every limit, a stepped one at both ends of
    every step."""
    for (op, backend), cap in capabilities.CAPABILITIES.items():
        for limit in cap.limits:
            if not limit.steps:
                yield pytest.param(op, backend, limit.name, None, limit.value,
                                   id=f"{op}-{backend}-{limit.name}")
                continue
            smallest = 1
            for largest, bound in limit.steps:
                for key in (smallest, largest):
                    yield pytest.param(op, backend, limit.name, key, bound,
                                       id=f"{op}-{backend}-{limit.name}-{limit.key}{key}")
                smallest = largest + 1


def test_every_limit_has_a_reason_case():
    declared = {(op, limit.name) for (op, _), cap in capabilities.CAPABILITIES.items()
                for limit in cap.limits}
    assert declared == set(CALLS)


@pytest.mark.parametrize("op, backend, name, key, bound", list(_limit_cases()))
def test_limit_gives_a_reason_past_it_and_none_at_it(op, backend, name, key, bound,
                                                     host_ops, monkeypatch):
    """The op's own reasons function on size-only CPU tensors: the limit's reason
    appears at limit + 1 (naming the value and the limit) and not at the limit. Other
    backends than the one declaring the limit never give it."""
    # The device / extension reasons are tested elsewhere; here only sizes count.
    monkeypatch.setattr(_backend, "common_reasons", lambda *args, **kwargs: [])
    for call in CALLS[op, name]:
        assert call(backend, bound, key) == [], call.__name__
        over = call(backend, bound + 1, key)
        assert len(over) == 1 and f"{bound + 1}" in over[0] and f"> {bound}" in over[0], \
            (call.__name__, over)
        for other in capabilities.declared_backends(op):
            if capabilities.capability(op, other).limit(name) is None:
                assert not [r for r in call(other, bound + 1, key) if f"> {bound}" in r], \
                    (call.__name__, other)


def test_dtype_reasons_follow_the_declared_dtypes():
    x = _t(1, 2, 3, 3, dtype=torch.float64)
    assert capabilities.dtype_reasons("avg_pool2d", "triton", [x]) == [
        "float64 runs only on the reference backend"]
    assert capabilities.dtype_reasons("avg_pool2d", "reference", [x]) == []
    mask = _t(1, 1, 4, 4, dtype=torch.bool)  # a bool attention mask is not a float input
    assert capabilities.dtype_reasons("scaled_dot_product_attention", "cuda", [mask]) == []


# ----------------------------------------------------------------------------- documents

def test_readme_support_matrix_is_generated_from_the_declarations():
    text = README.read_text()
    assert MATRIX_START in text and MATRIX_END in text, \
        f"README.md: the support matrix must sit between {MATRIX_START!r} and {MATRIX_END!r}"
    current = text.split(MATRIX_START, 1)[1].split(MATRIX_END, 1)[0]
    assert current == capabilities.support_matrix_markdown(), (
        "README.md's support matrix is out of date: replace the lines between its markers "
        "with the output of `python -m pyvit_ops.info --markdown`")


def _main(*argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        info.main(list(argv))
    return out.getvalue()


def test_info_prints_every_declaration():
    text = _main()
    for op in capabilities.OPERATORS:
        assert f"{op.name}  (automatic order on CUDA: {', '.join(op.order)})" in text
    for cap in capabilities.CAPABILITIES.values():
        assert cap.float32 in text and cap.architectures in text
        for line in [limit.describe() for limit in cap.limits] + list(cap.conditions):
            assert f"limit: {line}" in text


def test_info_json_has_every_declaration():
    data = json.loads(_main("--json"))
    for (op, backend), cap in capabilities.CAPABILITIES.items():
        entry = data["operators"][op][backend]
        assert {"available", "reason"} <= set(entry)
        assert {k: entry[k] for k in cap.as_dict()} == json.loads(json.dumps(cap.as_dict()))
    assert data["operators"]["window_attention"]["triton"]["limits"][0]["value"] == 576


def test_info_markdown_is_the_support_matrix():
    assert _main("--markdown") == capabilities.support_matrix_markdown()
