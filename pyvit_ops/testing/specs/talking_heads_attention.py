"""Static compile specs of the talking-heads Triton kernels
(``pyvit_ops.kernels.talking_heads_attention``): every (kernel, tile config, dtype) its
launchers can pick, for ``pyvit_ops.testing.static``.

Each kernel's arguments are described explicitly below: an argument the tables do not
describe is an error, so renaming one in a kernel cannot silently change a spec."""
import torch
import triton

from pyvit_ops.kernels import talking_heads_attention as kernels

_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_BLOCK_DS = tuple(2 ** i for i in range(4, kernels.MAX_HEAD_DIM.bit_length()))

# q, k, v and their gradients: (B, H, N, D) views with a unit head-dim stride (timm's
# views of its qkv projection); the parameters: timm's fp32 Linear(heads, heads).
_TOKENS = {"q", "k", "v", "out", "dout", "dq", "dk", "dv"}
_PARAMS = {"l", "bl", "w", "bw"}
_SCRATCH = {"stats", "delta", "dmix"}
_SIZES = {"H", "N", "D"}


def _signature(fn, dtype):
    """The signature entry of every runtime argument, and the arguments and stride-tuple
    elements divisible by 16: head dims are multiples of 16 in practice (CaiT's 48, 64),
    and so are the batch, head and token strides of timm's views of its qkv projection
    and of the gradients."""
    signature, divisible = {}, ["D"]
    for arg in fn.arg_names:
        name = arg.removesuffix("_ptr")
        if arg.endswith("_ptr"):
            element = dtype if name in _TOKENS else "fp32"
            assert name in _TOKENS | _PARAMS | _SCRATCH, arg
            signature[arg] = f"*{element}"
        elif arg.startswith("stride_"):
            assert arg.removeprefix("stride_") in _TOKENS, arg
            signature[arg] = ("i32", "i32", "i32", 1)
            divisible += [(arg, i) for i in range(3)]
        elif arg in _SIZES:
            signature[arg] = "i32"
        elif arg == "sm_scale":
            signature[arg] = "fp32"
    return signature, divisible


_KERNELS = {"fwd": kernels._talking_heads_attention_fwd_kernel,
            "bwd_dq": kernels._talking_heads_attention_bwd_dq_kernel,
            "bwd_dk": kernels._talking_heads_attention_bwd_dk_kernel,
            "bwd_dv": kernels._talking_heads_attention_bwd_dv_kernel}


def static_compile_specs():
    """Every kernel at every padded head count and head dim in every dtype (the tile
    config follows from the padded head count)."""
    specs = []
    for torch_dtype, dtype in _DTYPES.items():
        # Padded head counts: heads 1 to the dtype's limit.
        max_heads = kernels.MAX_HEADS_FP32 if torch_dtype == torch.float32 else kernels.MAX_HEADS
        for block_h in (2 ** i for i in range(max_heads.bit_length())):
            cfg = kernels.tile_config(block_h)
            for block_d in _BLOCK_DS:
                for key, fn in _KERNELS.items():
                    options = kernels.launch_options(cfg)
                    constexprs = dict(PRECISION=kernels._precision(torch_dtype),
                                      BLOCK_H=block_h, BLOCK_D=block_d,
                                      BLOCK_M=options.pop("BLOCK_M"),
                                      BLOCK_N=options.pop("BLOCK_N"))
                    signature, divisible = _signature(fn, dtype)
                    described = set(signature) | set(constexprs)
                    if described != set(fn.arg_names):
                        raise ValueError(f"{fn.__name__}: arguments not described "
                                         f"{sorted(set(fn.arg_names) - described)}")
                    specs.append({
                        "name": f"talking_heads_{key}_h{block_h}d{block_d}"
                                f"m{cfg.block_m}n{cfg.block_n}w{cfg.num_warps}_{dtype}",
                        "fn": fn, "signature": signature, "constexprs": constexprs,
                        "divisible_by_16": divisible, "dtype": dtype, "uses_dot": True, **options})
    return specs
