"""Static compile specs of the SDPA Triton kernels
(``pyvit_ops.kernels.scaled_dot_product_attention``): every (kernel, tile config, dtype,
head-dim bucket) its launchers can pick, for ``pyvit_ops.testing.static``.

Each kernel's arguments are described explicitly below (pointers with their element
type, strided tensors with their axes, scalars, integer sizes): an argument the tables
do not describe is an error, so renaming one in a kernel cannot silently change a spec."""
from typing import NamedTuple

import torch

from pyvit_ops.kernels import scaled_dot_product_attention as kernels
from pyvit_ops.kernels._common import DTYPE_NAMES

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BLOCK_DS = (16, 32, 64, 128)
# Query lengths that reach every tile config of _fwd_config / _dq_config.
_NQS = (1, 64, 197)


class _Tensor(NamedTuple):
    """A pointer argument ``<name>_ptr`` and its strides: one tuple argument
    ``stride_<name>`` of ``axes`` (none without axes), after a scalar
    ``stride_<name>_split`` with ``split``."""
    name: str
    element: str        # "data" (the inputs' dtype), "bias", "dbias", "seed", "fp32", "u8"
    axes: tuple = ()    # the stride tuple's axes, in order
    split: bool = False


def _rows(name, axis="m"):
    return _Tensor(name, "data", ("z1", "z2", axis, "d"))


_BIAS = _Tensor("bias", "bias", ("z1", "z2", "m", "n"))
_DBIAS = _Tensor("dbias", "dbias", ("z1", "z2", "m", "n"), split=True)
# Unit strides of dense layouts, which the JIT specialises to the constexpr 1: the head
# dim of every (N, D) tensor, the keys of a dense bias and of the dbias buffer.
_UNIT_AXES = {"data": ("d",), "bias": ("n",), "dbias": ("n",)}
_SCALARS = ("sm_scale", "dropout_p", "dropout_scale")


class _Kernel(NamedTuple):
    fn: object
    tensors: tuple      # of _Tensor, in argument order
    scalars: tuple      # fp32 scalars
    sizes: tuple        # i32 sizes
    uses_dot: bool


_ATTENTION_SIZES = ("Z2", "Nq", "Nk", "D")
_BACKWARD_SIZES = _ATTENTION_SIZES + ("NG", "NB", "B_CHUNK")
_INPUTS = (_rows("q"), _rows("k", "n"), _rows("v", "n"), _BIAS, _rows("dout"),
           _Tensor("lse", "fp32"), _Tensor("delta", "fp32"))
_SEED = _Tensor("seed", "seed")

_KERNELS = {
    "fwd": _Kernel(kernels._scaled_dot_product_attention_fwd_kernel,
                   (_rows("q"), _rows("k", "n"), _rows("v", "n"), _BIAS, _rows("out"),
                    _Tensor("lse", "fp32"), _SEED), _SCALARS, _ATTENTION_SIZES, True),
    "dkdv": _Kernel(kernels._scaled_dot_product_attention_bwd_dkdv_kernel,
                    _INPUTS + (_rows("dk", "n"), _rows("dv", "n"), _DBIAS, _SEED),
                    _SCALARS, _BACKWARD_SIZES, True),
    "dq": _Kernel(kernels._scaled_dot_product_attention_bwd_dq_kernel,
                  _INPUTS + (_rows("dq"), _DBIAS, _SEED),
                  _SCALARS, _BACKWARD_SIZES, True),
    "dropout_mask": _Kernel(kernels._scaled_dot_product_attention_dropout_mask_kernel,
                            (_Tensor("keep", "u8"), _SEED), ("dropout_p",), ("numel", "nq_nk"),
                            False),
    "dtable": _Kernel(kernels._scaled_dot_product_attention_dtable_kernel,
                      (_Tensor("dbias", "fp32", ("split", "group", "m")),
                       _Tensor("dtable", "data")),
                      (), ("SPLITS", "ROWS", "GH", "GW"), False),
}
# The kernels' rel_pos_grid (gh, gw, class tokens): (1, 1, 0) without a table (the 1s
# specialised to constexprs, 0 divisible by 16), BEiT's class token 1 with one.
_NO_GRID, _BEIT_GRID = (1, 1, "i32"), ("i32", "i32", 1)


def _elements(dtype, flags):
    """Pointer element types. Without a bias or dropout the launchers pass q for the
    unread bias and seed; DBIAS_DIRECT stores a half bias's gradient in its dtype, else
    dbias is reduced in an fp32 buffer."""
    direct = flags.get("DBIAS_DIRECT", False)
    wide = flags.get("BIAS") in (kernels.BIAS_FLOAT, kernels.BIAS_TABLE) and not direct
    return {"data": dtype, "fp32": "fp32", "u8": "u8", "bias": "fp32" if wide else dtype,
            "dbias": dtype if direct else "fp32",
            "seed": "i64" if flags.get("DROPOUT", True) else dtype}


def _arguments(kernel, elements, aligned_dbias, grid):
    """The signature entry of every runtime argument, and the arguments and stride-tuple
    elements (as paths) divisible by 16. A unit stride is the constexpr 1 in its tuple,
    as the JIT specialises it. Head dims are multiples of 16 in practice (16 ... 128),
    and so are the row and batch strides of q / k / v / out and of the padded fp32 dbias
    buffer; not the user's bias, nor the dbias stored directly in its shape
    (``aligned_dbias`` False)."""
    signature, divisible = {}, [name for name in kernel.sizes if name == "D"]
    for t in kernel.tensors:
        signature[f"{t.name}_ptr"] = "*" + elements[t.element]
        aligned = t.element == "data" or (t.element == "dbias" and aligned_dbias)
        if t.split:
            signature[f"stride_{t.name}_split"] = "i32"
            divisible += [f"stride_{t.name}_split"] if aligned else []
        if t.axes:
            # (a table view's unit stride is the head's: (T, heads) read by column)
            unit = ("z2",) if t.name == "bias" and grid == _BEIT_GRID else \
                _UNIT_AXES.get(t.element, ())
            name = f"stride_{t.name}"
            signature[name] = tuple(1 if axis in unit else "i32" for axis in t.axes)
            divisible += [(name, i) for i, axis in enumerate(t.axes)
                          if aligned and axis not in unit]
    signature.update({name: "fp32" for name in kernel.scalars})
    signature.update({name: "i32" for name in kernel.sizes})
    if "rel_pos_grid" in kernel.fn.arg_names:
        signature["rel_pos_grid"] = grid
        divisible += [] if grid == _BEIT_GRID else [("rel_pos_grid", 2)]
    return signature, divisible


def _spec(name, key, dtype, flags, options):
    """One spec of kernel ``key`` for inputs of ``dtype``; ``flags``: its constexpr options,
    ``options``: its launch options (the BLOCK_M / BLOCK_N constexprs among them)."""
    kernel = _KERNELS[key]
    fn = kernel.fn
    grid = _BEIT_GRID if flags.get("BIAS") == kernels.BIAS_TABLE else _NO_GRID
    signature, divisible = _arguments(kernel, _elements(dtype, flags),
                                      aligned_dbias=not flags.get("DBIAS_DIRECT", False),
                                      grid=grid)
    options = dict(options)
    constexprs = dict(flags, **{k: options.pop(k) for k in ("BLOCK_M", "BLOCK_N", "LEAD",
                                                            "BLOCK_R", "BLOCK_P")
                                if k in options})
    signature.update({arg: "constexpr" for arg in constexprs})
    if set(signature) != set(fn.arg_names):
        raise ValueError(f"{fn.__name__}: arguments not described "
                         f"{sorted(set(fn.arg_names) - set(signature))}, described but absent "
                         f"{sorted(set(signature) - set(fn.arg_names))}")
    return {"name": name, "fn": fn, "signature": {arg: signature[arg] for arg in fn.arg_names},
            "constexprs": constexprs, "divisible_by_16": divisible, "dtype": dtype,
            "uses_dot": kernel.uses_dot, **options}


def static_compile_specs():
    """Every (kernel, tile config, dtype, head-dim bucket) the launchers can pick, each
    in its lightest and its heaviest feature variant, the heaviest with 32-bit and with
    64-bit offsets (OFFS64).

    Bias kind, dropout and dbias are constexprs too; compiling all their combinations
    (~600 specs) is too slow for CI, so each config is compiled without them (the
    inference path) and with all of them at their costliest: an fp32 bias (wider loads
    than a half or bool one), dropout, and the dbias reduction with both batch dims
    broadcast. Every other variant adds a subset of that code to the light one.
    """
    specs = []
    for torch_dtype in _DTYPES:
        dtype = DTYPE_NAMES[torch_dtype]
        precision = kernels._precision(torch_dtype)
        for block_d in _BLOCK_DS:
            for variant in ("light", "heavy", "heavy64"):
                heavy, offs64 = variant != "light", variant == "heavy64"
                tag = f"d{block_d}_{variant}_{dtype}"
                common = dict(BIAS=kernels.BIAS_FLOAT if heavy else kernels.BIAS_NONE,
                              DROPOUT=heavy, PRECISION=precision, OFFS64=offs64,
                              BLOCK_D=block_d)
                for cfg in sorted({kernels._fwd_config(nq, block_d, torch_dtype, offs64)
                                   for nq in _NQS}):
                    specs.append(_spec(
                        f"sdpa_fwd_m{cfg.block_m}n{cfg.block_n}w{cfg.num_warps}_{tag}", "fwd",
                        dtype, common, kernels.launch_options(cfg)))
                bcast = dict(BCAST1=heavy, BCAST2=heavy)
                for cfg in sorted({kernels._dq_config(nq, block_d, torch_dtype) for nq in _NQS}):
                    specs.append(_spec(
                        f"sdpa_bwd_dq_m{cfg.block_m}n{cfg.block_n}w{cfg.num_warps}_{tag}", "dq",
                        dtype, dict(common, **bcast, DBIAS=heavy, DBIAS_DIRECT=False),
                        kernels.launch_options(cfg)))
                if heavy and torch_dtype != torch.float32:
                    # dbias stored directly (a half bias, no broadcast batch) into rows
                    # of the user's width: none of its strides is a multiple of 16.
                    for cfg in sorted({kernels._dq_config(nq, block_d, torch_dtype, True)
                                       for nq in _NQS}):
                        specs.append(_spec(
                            f"sdpa_bwd_dq_m{cfg.block_m}n{cfg.block_n}w{cfg.num_warps}"
                            f"_d{block_d}_direct{'64' if offs64 else ''}_{dtype}", "dq", dtype,
                            dict(common, BCAST1=False, BCAST2=False, DBIAS=True,
                                 DBIAS_DIRECT=True), kernels.launch_options(cfg)))
                cfg = kernels._dkdv_config(block_d, torch_dtype)
                specs.append(_spec(
                    f"sdpa_bwd_dkdv_m{cfg.block_m}n{cfg.block_n}w{cfg.num_warps}_{tag}", "dkdv",
                    dtype, dict(common, **bcast, DBIAS=heavy), kernels.launch_options(cfg)))
    specs.append(_spec("sdpa_dropout_mask", "dropout_mask", "u8", dict(BLOCK=kernels._MASK_BLOCK),
                       dict(num_warps=4, num_stages=1)))
    return specs + _table_specs()


# BEiT's head dim 64 at 14x14 (224 px) and 24x24 / 32x32 (384 / 512 px) patch grids.
_TABLE_BLOCK_D = 64
_TABLE_PATCHES = (14 * 14, 32 * 32)


def _table_specs():
    """The relative-position table mode (BIAS_TABLE, BEiT's class token) of the configs
    BEiT's N = 197 / 577 / 1025 tokens at head dim 64 pick, with dropout and the table
    gradient (the dq kernel's tile partials over a batch-broadcast table, then the
    dtable kernel at each pair-tile size)."""
    specs = []
    for torch_dtype in _DTYPES:
        dtype = DTYPE_NAMES[torch_dtype]
        common = dict(BIAS=kernels.BIAS_TABLE, DROPOUT=True,
                      PRECISION=kernels._precision(torch_dtype), OFFS64=False,
                      BLOCK_D=_TABLE_BLOCK_D)
        tag = f"d{_TABLE_BLOCK_D}_table_{dtype}"
        cfg = kernels._fwd_config(197, _TABLE_BLOCK_D, torch_dtype, table=True)
        specs.append(_spec(f"sdpa_fwd_m{cfg.block_m}n{cfg.block_n}w{cfg.num_warps}_{tag}",
                           "fwd", dtype, common, kernels.launch_options(cfg)))
        bcast = dict(BCAST1=True, BCAST2=False)
        cfg = kernels._dq_config(197, _TABLE_BLOCK_D, torch_dtype)
        specs.append(_spec(f"sdpa_bwd_dq_m{cfg.block_m}n{cfg.block_n}w{cfg.num_warps}_{tag}",
                           "dq", dtype, dict(common, **bcast, DBIAS=True, DBIAS_DIRECT=False),
                           kernels.launch_options(cfg)))
        cfg = kernels._dkdv_config(_TABLE_BLOCK_D, torch_dtype)
        specs.append(_spec(f"sdpa_bwd_dkdv_m{cfg.block_m}n{cfg.block_n}w{cfg.num_warps}_{tag}",
                           "dkdv", dtype, dict(common, **bcast, DBIAS=False),
                           kernels.launch_options(cfg)))
        for patches in _TABLE_PATCHES:
            options = kernels.dtable_options(patches, 1)
            specs.append(_spec(f"sdpa_dtable_p{options['BLOCK_P']}r{options['BLOCK_R']}_{dtype}",
                               "dtable", dtype, {}, options))
    return specs
