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
# The tuple arguments of sizes: ``sizes`` (B, H, W, n_wh, n_ww, heads, D) and ``window``
# (WH, WW, SH, SW).
_SIZES_TUPLE = ("B", "H", "W", "n_wh", "n_ww", "HEADS", "D")
_WINDOW_TUPLE = ("WH", "WW", "SH", "SW")


class _Tensor(NamedTuple):
    """A pointer argument ``<name>_ptr`` and, if ``strided``, its stride tuple
    ``stride_<name>`` over (B, H, W, heads, D)."""
    name: str
    element: str          # "data" (the inputs' dtype), "table" (the table's), "fp32"
    strided: bool = False


class _Kernel(NamedTuple):
    tensors: tuple        # of _Tensor
    sizes: tuple          # i32 arguments besides the sizes / window tuples
    floats: tuple         # fp32 arguments
    divisible: tuple      # i32 arguments that are multiples of 16 at the head dims listed


_INPUTS = (_Tensor("q", "data", True), _Tensor("k", "data", True), _Tensor("v", "data", True),
           _Tensor("table", "table"), _Tensor("pad_k", "data"), _Tensor("pad_v", "data"),
           _Tensor("gain", "fp32"), _Tensor("lse", "fp32"))
_SIZES = ("WINDOWS_PER_PROGRAM",)
_FLOATS = ("scale", "inv_scale", "mask_value")
_FWD = _Kernel(_INPUTS + (_Tensor("out", "data"),), _SIZES, _FLOATS, (("sizes", 6),))
_GRADS = (_Tensor("dout", "data", True), _Tensor("dq", "data"), _Tensor("dk", "data"),
          _Tensor("dv", "data"), _Tensor("dbias", "fp32"), _Tensor("dpad", "fp32"),
          _Tensor("dlog_gain", "fp32"))
# dq / dk / dv share one token stride: heads * D, or 3 * heads * D packed.
_BWD = _Kernel(_INPUTS + _GRADS, _SIZES + ("FIRST_PROGRAM", "stride_dqkv_token"), _FLOATS,
               (("sizes", 6), "stride_dqkv_token"))
# The tiled backward's dq pass stores delta for the other passes (and, for cosine
# attention, the probability sums).
_BWD_TILED = _BWD._replace(tensors=_BWD.tensors + (_Tensor("delta", "fp32"),
                                                   _Tensor("psum", "fp32")),
                           sizes=_SIZES + ("stride_dqkv_token",))
_KERNELS = {
    kernels._window_attention_fwd_kernel: _FWD,
    kernels._window_attention_fwd_tiled_kernel: _FWD,
    kernels._window_attention_bwd_kernel: _BWD,
    kernels._window_attention_bwd_tiled_kernel: _BWD_TILED,
}


def _arguments(kernel, dtype, table):
    """``{argument: type}`` of every runtime argument and the arguments (tuple elements
    as paths) divisible by 16. The head-dim stride is the constant 1 in its tuple
    (Triton specialises it for dense rows); the other strides are multiples of 16 for
    the head dims listed (so are heads * D)."""
    element = {"data": "fp32" if dtype in kernels._FP32 else dtype, "table": table,
               "fp32": "fp32"}
    types, divisible = {}, list(kernel.divisible)
    for t in kernel.tensors:
        types[f"{t.name}_ptr"] = f"*{element[t.element]}"
        if t.strided:
            name = f"stride_{t.name}"
            types[name] = tuple(1 if axis == "d" else "i32" for axis in _STRIDE_AXES)
            divisible += [(name, i) for i, axis in enumerate(_STRIDE_AXES) if axis != "d"]
    types["sizes"] = ("i32",) * len(_SIZES_TUPLE)
    types["window"] = ("i32",) * len(_WINDOW_TUPLE)
    types.update({name: "i32" for name in kernel.sizes})
    types.update({name: "fp32" for name in kernel.floats})
    return types, divisible


def _spec(name, fn, dtype, constexprs, num_warps, num_stages, archs, table):
    types, divisible = _arguments(_KERNELS[fn], dtype, table)
    constexprs = dict(constexprs)
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


def _grid_partitions(dtype, block_n, block_d, cosine):
    """GRID_PARTITION values compiled: MaxViT's grid attention changes only where a
    window's tokens are, so its variants are compiled for MaxViT's case alone: half
    precision, head dims 32 and 64, 49-token windows (one 64-slot tile) and larger
    (tiled, ``block_n`` None), no cosine (the table is checked per variant)."""
    grid = (dtype in ("fp16", "bf16") and block_d in (32, 64) and not cosine
            and block_n in (None, 64))
    return (False, True) if grid else (False,)


def _single_tile_picks(pick):
    for arch, dtype, block_n, block_d, c, grid in (
            (*key, grid) for key in itertools.product(
                (80, 90), kernels._SPEC_DTYPES, kernels._BLOCK_NS, kernels._BLOCK_DS,
                (True, False))
            for grid in _grid_partitions(key[1], key[2], key[3], key[4])):
        if (dtype in kernels._FP32 and block_d > kernels.max_head_dim_fp32(block_n)
                or kernels._tiled(block_n, dtype, c)):
            continue
        tag = "_grid" if grid else ""
        for kernel, backward in ((kernels._window_attention_fwd_kernel, False),
                                 (kernels._window_attention_bwd_kernel, True)):
            variants = [((("HAS_TABLE", t), ("COSINE", c)), _flags(t, c)) for t in (True, False)]
            if backward:
                # (HAS_TABLE, dbias wanted, pad launch) as window_attention_bwd sees them.
                variants = []
                for t, bias, pad in itertools.product((True, False), repeat=3):
                    if bias and not t or grid and (pad or not t):
                        continue
                    for p, g in kernels._bwd_passes(block_n, block_d, dtype, bias, pad, c,
                                                    grid):
                        variants.append(((("HAS_TABLE", t), ("COSINE", c), ("PASS", p),
                                          ("BIAS_GRAD", g),
                                          ("BLOCK_K", kernels._chunk(block_d, p))),
                                         f"{_flags(t, c)}"
                                         f"{('', '_pad', '_bias')[p]}{'_dbias' if g else ''}"))
            elif grid:
                variants = variants[:1]  # with a table
            for constexprs, suffix in variants:
                constexprs += (("GRID_PARTITION", grid), ("BLOCK_N", block_n),
                               ("BLOCK_D", block_d))
                pick((f"{kernel.__name__}_n{block_n}_d{block_d}{suffix}{tag}_{dtype}", kernel,
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
        variants = [(*v, False) for v in dict.fromkeys(variants)] + [
            (p, t, c, pad, True) for p, t, c, pad in dict.fromkeys(variants)
            if t and not pad and True in _grid_partitions(dtype, None, block_d, c)]
        for pass_, t, c, pad, grid in variants:
            kernel = kernels._window_attention_fwd_tiled_kernel if pass_ is None \
                else kernels._window_attention_bwd_tiled_kernel
            constexprs = (("HAS_TABLE", t), ("COSINE", c), ("GRID_PARTITION", grid))
            if pass_ is not None:
                constexprs += (("PASS", pass_), ("PAD_GRAD", pad))
            config = kernels._tiled_config(block_d, dtype, pass_, c)
            constexprs += (("BLOCK_M", config.block_m), ("BLOCK_N", config.block_n),
                           ("BLOCK_D", block_d))
            suffix = (f"{_flags(t, c)}{tiled_names[pass_]}{'_pad' if pad else ''}"
                      f"{'_grid' if grid else ''}")
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
