"""Static compile specs of the window-attention Triton kernels
(``pyvit_ops.kernels.window_attention``): every (kernel, blocks, flags, dtype, warps,
stages) its launchers can pick, for ``pyvit_ops.testing.static``.

Float32 appears twice: with TF32 products ("fp32") and with 3xTF32 ("fp32x3", see
``_dtype_name``). A spec the launchers pick on one of sm_80 / sm_90a only names that arch
(``archs``, and an ``_sm80`` / ``_sm90`` suffix). Each kernel's runtime arguments are
described explicitly below; an argument the tables do not describe is an error."""
import itertools
from typing import NamedTuple

from pyvit_ops.kernels import window_attention as kernels
from pyvit_ops.kernels._common import DTYPE_NAMES

_STRIDE_AXES = ("b", "h", "w", "head", "d")


class _Tensor(NamedTuple):
    """A pointer argument ``<name>_ptr`` and, if ``strided``, its stride arguments
    ``stride_<name>_<axis>`` over (B, H, W, heads, D)."""
    name: str
    element: str          # "data" (the inputs' dtype), "table" (the table's), "fp32"
    strided: bool = False


class _Kernel(NamedTuple):
    tensors: tuple        # of _Tensor
    sizes: tuple          # i32 arguments
    floats: tuple         # fp32 arguments
    divisible: tuple      # i32 arguments that are multiples of 16 at the head dims listed


_INPUTS = (_Tensor("q", "data", True), _Tensor("k", "data", True), _Tensor("v", "data", True),
           _Tensor("table", "table"), _Tensor("pad_k", "data"), _Tensor("pad_v", "data"),
           _Tensor("gain", "fp32"), _Tensor("lse", "fp32"))
_SIZES = ("B", "H", "W", "n_wh", "n_ww", "HEADS", "D", "WINDOWS_PER_PROGRAM", "WH", "WW",
          "SH", "SW")
_FLOATS = ("scale", "inv_scale", "mask_value")
_FWD = _Kernel(_INPUTS + (_Tensor("out", "data"),), _SIZES, _FLOATS, ("D",))
_GRADS = (_Tensor("dout", "data", True), _Tensor("dq", "data"), _Tensor("dk", "data"),
          _Tensor("dv", "data"), _Tensor("dbias", "fp32"), _Tensor("dpad", "fp32"),
          _Tensor("dlog_gain", "fp32"))
# dq / dk / dv share one token stride: heads * D, or 3 * heads * D packed.
_BWD = _Kernel(_INPUTS + _GRADS, _SIZES + ("FIRST_PROGRAM", "stride_dqkv_token"), _FLOATS,
               ("D", "stride_dqkv_token"))
# The tiled backward reads the forward's output for delta, which its dq pass stores (and,
# for cosine attention, the probability sums).
_BWD_TILED = _BWD._replace(tensors=_BWD.tensors + (_Tensor("out", "data"),
                                                   _Tensor("delta", "fp32"),
                                                   _Tensor("psum", "fp32")),
                           sizes=_SIZES + ("stride_dqkv_token",))
_KERNELS = {
    kernels._window_attention_fwd_kernel: _FWD,
    kernels._window_attention_fwd_tiled_kernel: _FWD,
    kernels._window_attention_bwd_kernel: _BWD,
    kernels._window_attention_bwd_tiled_kernel: _BWD_TILED,
}


def _arguments(kernel, dtype, table):
    """``{argument: type}`` of every runtime argument and the ones divisible by 16. The
    head-dim strides are the constexpr 1 (Triton specialises them for dense rows); the
    other strides are multiples of 16 for the head dims listed (so are heads * D)."""
    element = {"data": "fp32" if dtype in kernels._FP32 else dtype, "table": table,
               "fp32": "fp32"}
    types, divisible = {}, list(kernel.divisible)
    for t in kernel.tensors:
        types[f"{t.name}_ptr"] = f"*{element[t.element]}"
        if t.strided:
            for axis in _STRIDE_AXES:
                name = f"stride_{t.name}_{axis}"
                types[name] = "constexpr" if axis == "d" else "i32"
                divisible += [name] if axis != "d" else []
    types.update({name: "i32" for name in kernel.sizes})
    types.update({name: "fp32" for name in kernel.floats})
    return types, divisible


def _spec(name, fn, dtype, constexprs, num_warps, num_stages, archs, table):
    types, divisible = _arguments(_KERNELS[fn], dtype, table)
    constexprs = dict(constexprs, **{a: 1 for a, kind in types.items() if kind == "constexpr"})
    constexprs["PRECISION"] = kernels._precision(dtype)
    signature = {}
    for arg in fn.arg_names:
        signature[arg] = "constexpr" if arg in constexprs else types.pop(arg)
        types.pop(arg, None)
    if types:
        raise ValueError(f"{fn.__name__} has no arguments {sorted(types)}")
    spec = {"name": name + ("" if table == "fp32" else f"_table_{table}"), "fn": fn,
            "signature": signature, "constexprs": constexprs, "num_warps": num_warps,
            "num_stages": num_stages, "uses_dot": True, "dtype": dtype,
            "divisible_by_16": divisible}
    if len(archs) == 1:
        spec["name"] += f"_sm{archs[0]}"
        spec["archs"] = tuple(archs)
    return spec


def _flags(table, cosine):
    """The name suffix of HAS_TABLE and COSINE."""
    return f"{'_table' if table else ''}{'_cos' if cosine else ''}"


def _single_tile_picks(pick):
    for arch, dtype, block_n, block_d, c in itertools.product(
            (80, 90), kernels._SPEC_DTYPES, kernels._BLOCK_NS, kernels._BLOCK_DS, (True, False)):
        if (dtype in kernels._FP32 and block_d > kernels.max_head_dim_fp32(block_n)
                or kernels._tiled(block_n, dtype, c)):
            continue
        for kernel, backward in ((kernels._window_attention_fwd_kernel, False),
                                 (kernels._window_attention_bwd_kernel, True)):
            variants = [((("HAS_TABLE", t), ("COSINE", c)), _flags(t, c)) for t in (True, False)]
            if backward:
                # (HAS_TABLE, dbias wanted, pad launch) as window_attention_bwd sees them.
                variants = []
                for t, bias, pad in itertools.product((True, False), repeat=3):
                    if bias and not t:
                        continue
                    for p, g in kernels._bwd_passes(block_n, block_d, dtype, bias, pad, c):
                        variants.append(((("HAS_TABLE", t), ("COSINE", c), ("PASS", p),
                                          ("BIAS_GRAD", g),
                                          ("BLOCK_K", kernels._chunk(block_d, p))),
                                         f"{_flags(t, c)}"
                                         f"{('', '_pad', '_bias')[p]}{'_dbias' if g else ''}"))
            for constexprs, suffix in variants:
                constexprs += (("BLOCK_N", block_n), ("BLOCK_D", block_d))
                pick((f"{kernel.__name__}_n{block_n}_d{block_d}{suffix}_{dtype}", kernel,
                      dtype, constexprs,
                      *kernels._config(block_n, block_d, dtype, backward, arch, c)), arch)


def _tiled_picks(pick):
    tiled_names = {None: "", kernels._DQ.value: "_dq", kernels._DKV.value: "_dkv",
                   kernels._BIAS.value: "_bias"}
    for arch, dtype, block_d in itertools.product((80, 90), kernels._SPEC_DTYPES,
                                                  kernels._BLOCK_DS):
        if dtype in kernels._FP32 and block_d > kernels.max_head_dim_fp32(
                kernels._BLOCK_NS[-1] + 1):
            continue
        # (pass or None for the forward, HAS_TABLE, COSINE, PAD_GRAD) as the tiled
        # launchers see them.
        variants = [(None, t, c, False) for t, c in itertools.product((True, False), repeat=2)]
        for t, c, bias in itertools.product((True, False), repeat=3):
            if bias and not t:
                continue
            for pass_ in kernels._tiled_passes(bias):
                variants += [(pass_, t, c, pad) for pad in
                             ((False, True) if pass_ == kernels._DKV.value else (False,))]
        for pass_, t, c, pad in dict.fromkeys(variants):
            kernel = kernels._window_attention_fwd_tiled_kernel if pass_ is None \
                else kernels._window_attention_bwd_tiled_kernel
            constexprs = (("HAS_TABLE", t), ("COSINE", c))
            if pass_ is not None:
                constexprs += (("PASS", pass_), ("PAD_GRAD", pad))
            config = kernels._tiled_config(block_d, dtype, pass_, c)
            constexprs += (("BLOCK_M", config.block_m), ("BLOCK_N", config.block_n),
                           ("BLOCK_D", block_d))
            suffix = f"{_flags(t, c)}{tiled_names[pass_]}{'_pad' if pad else ''}"
            pick((f"{kernel.__name__}_m{config.block_m}_n{config.block_n}_d{block_d}{suffix}"
                  f"_{dtype}", kernel, dtype, constexprs, config.num_warps, config.num_stages),
                 arch)


def _dtable_specs():
    block_ps = sorted({kernels._pairs_block(n) for n in range(1, kernels.MAX_WINDOW_AREA + 1)})
    return [{"name": f"_window_attention_dtable_kernel_p{block_p}_{table}",
             "fn": kernels._window_attention_dtable_kernel,
             "signature": {"dbias_ptr": "*fp32", "dtable_ptr": f"*{table}", "GROUPS": "i32",
                           "HEADS": "i32", "ROWS": "i32", "WH": "i32", "WW": "i32",
                           "BLOCK_R": "constexpr", "BLOCK_P": "constexpr"},
             "constexprs": {"BLOCK_R": kernels._dtable_rows(block_p), "BLOCK_P": block_p},
             "num_warps": 4, "num_stages": 1, "uses_dot": False, "dtype": table}
            for block_p, table in itertools.product(block_ps, DTYPE_NAMES.values())]


def static_compile_specs():
    """Every (kernel, BLOCK_*, HAS_TABLE, COSINE, PASS, BIAS_GRAD / PAD_GRAD, dtype, warps,
    stages) the launchers can pick, with the table in fp32 (a parameter under autocast)
    and, for half inputs, in the inputs' dtype."""
    picks = {}   # (name, kernel, dtype, constexprs, warps, stages) -> archs

    def pick(key, arch):
        archs = picks.setdefault(key, [])
        if arch not in archs:
            archs.append(arch)

    _single_tile_picks(pick)
    _tiled_picks(pick)
    specs = []
    for (name, fn, dtype, constexprs, num_warps, num_stages), archs in picks.items():
        has_table = dict(constexprs)["HAS_TABLE"]
        for table in ["fp32"] + ([dtype] if has_table and dtype not in kernels._FP32 else []):
            specs.append(_spec(name, fn, dtype, constexprs, num_warps, num_stages, archs,
                               table))
    return specs + _dtable_specs()
