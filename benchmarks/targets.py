"""The performance targets, checked against measured (or modelled) figures.

Each ``*_lines`` function returns report lines; a line starts with ``MET``, ``MISSED``
or ``INFO`` and carries the figure it judged, so a missed target is never silent.
"""
from benchmarks import harness

# naive / fused, forward + backward, measured on a GPU at model shapes; the SDPA target
# is for attention with a bias at ViT-B size (BEiT-B's relative position bias).
TIMING = {
    "window_attention": (5.0, None),
    "avg_pool2d": (2.5, None),
    "elsa_attention": (10.0, None),
    "scaled_dot_product_attention": (3.0, "beit_b"),
    "talking_heads_attention": (3.0, None),
}
# fused bytes / compulsory bytes, per pass, for the memory-bound operators.
TRAFFIC = {"window_attention": {"fwd": 1.10, "bwd": 1.5},
           "elsa_attention": {"fwd": 1.10, "bwd": 1.5},
           "avg_pool2d": {"fwd": 1.10, "bwd": 1.5},
           "talking_heads_attention": {"fwd": 1.10, "bwd": 1.5},
           "scaled_dot_product_attention": {"fwd": 2.0, "bwd": 2.0}}
SDPA_MAX_TOKENS = 577  # the SDPA traffic target holds up to ViT-384's sequence length
# The CUDA C++ sources whose kernels compute matrix products (scores, outputs, gradients).
CUDA_MATMUL_SOURCES = ("scaled_dot_product_attention.cu", "window_attention.cu")
# The CPU path may be this much slower than the naive composition before it counts as
# slower: two medians of the same work differ by a few percent on a shared machine.
CPU_NOISE = 0.05


def _present(records):
    """The operators that have records, in the project's order."""
    ops = {r["op"] for r in records}
    return [op for op in harness.OPS if op in ops]


def _verdict(ok):
    return "MET   " if ok else "MISSED"


def _fmt_cases(cases):
    return ", ".join(f"{name} x{value:.2f}" for name, value in cases)


def timing_lines(rows, device_type):
    """GPU: naive / best pyvit_ops GPU backend (fwd+bwd) per shape against ``TIMING``.
    CPU: the CPU path (reference backend) against the naive composition: no slower
    (within ``CPU_NOISE``) and a lower peak memory, fwd+bwd, per shape."""
    lines = []
    full = [r for r in rows if r["pass"] == "full" and r.get("speedup_vs_naive") not in (None, "")]
    for op in _present(rows):
        op_rows = [r for r in full if r["op"] == op]
        if device_type == "cuda":
            lines += _gpu_timing(op, op_rows)
        else:
            lines += _cpu_timing(op, op_rows, [r for r in rows if r["op"] == op])
    return lines


def _best_by_case(rows, providers):
    best = {}
    for r in rows:
        if r["provider"] in providers:
            key = f"{r['model']} B={r['batch']}"
            value = float(r["speedup_vs_naive"])
            if key not in best or value > best[key][0]:
                best[key] = (value, r["provider"])
    return best


def _gpu_timing(op, rows):
    target, model = TIMING[op]
    rows = [r for r in rows if model is None or r["model"].startswith(model)]
    best = _best_by_case(rows, {"pyvit_ops[triton]", "pyvit_ops[cuda]"})
    cases = {f"{r['model']} B={r['batch']}" for r in rows}
    lines = []
    if cases - set(best):
        lines.append(f"MISSED {op}: no pyvit_ops GPU figure at {len(cases - set(best))} shapes: "
                     f"{', '.join(sorted(cases - set(best)))} (see the CSV's status column)")
    if not best:
        return lines + [f"MISSED {op}: naive/fused fwd+bwd >= {target}: no pyvit_ops GPU "
                        "measurement"]
    missed = [(k, v) for k, (v, _) in best.items() if v < target]
    where = "" if model is None else f" ({model})"
    values = [v for v, _ in best.values()]
    head = (f"{_verdict(not missed)} {op}{where}: naive/fused fwd+bwd >= {target}: "
            f"{len(best) - len(missed)}/{len(best)} shapes, min x{min(values):.2f}, "
            f"geomean x{harness.geomean(values):.2f} [measured]")
    return lines + [head] + ([f"       missed at: {_fmt_cases(missed)}"] if missed else [])


def _cpu_timing(op, full_rows, all_rows):
    cpu = [r for r in full_rows if r["provider"] == "pyvit_ops[reference]"]
    if not cpu:
        return [f"MISSED {op}: CPU path vs naive: no measurement"]
    peaks = {(r["model"], r["batch"], r["provider"]): r.get("peak_mem_mb")
             for r in all_rows if r["pass"] == "full"}
    slower, heavier = [], []
    for r in cpu:
        name = f"{r['model']} B={r['batch']}"
        ratio = float(r["speedup_vs_naive"])
        if ratio < 1.0 - CPU_NOISE:
            slower.append((name, ratio))
        mine, theirs = peaks[(r["model"], r["batch"], r["provider"])], peaks.get(
            (r["model"], r["batch"], harness.NAIVE))
        if mine in (None, "") or theirs in (None, ""):
            heavier.append((name, float("nan")))
        elif float(mine) >= float(theirs):
            heavier.append((name, float(mine) / max(float(theirs), 1e-9)))
    ratios = [float(r["speedup_vs_naive"]) for r in cpu]
    lines = [f"{_verdict(not slower)} {op}: CPU path no slower than naive on CPU (fwd+bwd, "
             f"within {CPU_NOISE:.0%}): {len(cpu) - len(slower)}/{len(cpu)} shapes, min "
             f"x{min(ratios):.2f}, geomean x{harness.geomean(ratios):.2f} "
             "[measured: naive/CPU path, fastest of interleaved runs]"]
    if slower:
        lines.append(f"       slower at: {_fmt_cases(slower)}")
    lines.append(f"{_verdict(not heavier)} {op}: CPU path peak memory below naive (fwd+bwd): "
                 f"{len(cpu) - len(heavier)}/{len(cpu)} shapes [measured]")
    if heavier:
        lines.append(f"       not lower at (CPU path / naive peak): {_fmt_cases(heavier)}")
    return lines


def traffic_lines(records):
    """Fused bytes against the compulsory minimum per op and pass; SDPA's K/V re-read
    factor; the modelled H100 naive/fused ratio against the timing targets."""
    lines = []
    for op in _present(records):
        recs = [r for r in records if r["op"] == op and "error" not in r]
        failed = {r["model"]: r["error"] for r in records if r["op"] == op and "error" in r}
        if failed:
            lines.append(f"MISSED {op}: no fused figure at {len(failed)} shapes: "
                         f"{', '.join(failed)} (first reason: {next(iter(failed.values()))})")
        if op == "scaled_dot_product_attention":
            recs = [r for r in recs if r["params"]["nk"] <= SDPA_MAX_TOKENS]
        for p in ("fwd", "bwd"):
            sel = [r for r in recs if r["pass"] == p and r.get("fused_bytes")]
            limit = TRAFFIC[op][p]
            if not sel:
                lines.append(f"MISSED {op} {p}: fused bytes <= {limit} x compulsory: "
                             "no measurement")
                continue
            # The interpreter gives two bounds of the DRAM traffic: every access (no cache;
            # a stencil's overlapping taps all count) and each address once (a perfect cache).
            for key, how in (("fused_bytes", "every access counted, no cache"),
                             ("fused_unique_bytes", "each address once, perfect cache")):
                ratios = [(r["model"], r[key] / r["compulsory_bytes"]) for r in sel]
                missed = [(n, v) for n, v in ratios if v > limit]
                lines.append(f"{_verdict(not missed)} {op} {p}: fused bytes <= {limit} x "
                             f"compulsory ({how}): {len(sel) - len(missed)}/{len(sel)} shapes, "
                             f"max x{max(v for _, v in ratios):.3f} [interpreter]")
                if missed:
                    lines.append(f"       over at: {_fmt_cases(missed)}")
        if op == "scaled_dot_product_attention":
            factors = [(r["model"], r["kv_reread"]) for r in recs
                       if r["pass"] == "fwd" and r.get("kv_reread") is not None]
            if factors:
                lines.append(f"INFO   {op} fwd: K/V read x times: {_fmt_cases(factors)}")
        target, model = TIMING[op]
        for suffix, how in (("", "no cache"), ("_cached", "perfect cache")):
            times = {}
            for r in recs:
                if r.get(f"model_h100_fused{suffix}_s") and (
                        model is None or r["model"].startswith(model)):
                    f, n = times.get(r["model"], (0.0, 0.0))
                    times[r["model"]] = (f + r[f"model_h100_fused{suffix}_s"],
                                         n + r["model_h100_naive_s"])
            if not times:
                continue
            values = [(name, n / f) for name, (f, n) in times.items()]
            missed = [(n, v) for n, v in values if v < target]
            where = "" if model is None else f" ({model})"
            lines.append(f"{_verdict(not missed)} {op}{where}: modelled H100 naive/fused fwd+bwd "
                         f">= {target} (fused {how}): {len(values) - len(missed)}/{len(values)} "
                         f"shapes, min x{min(v for _, v in values):.2f} [MODEL, not a measurement]")
            if missed:
                lines.append(f"       below at: {_fmt_cases(missed)}")
    return lines


def expects_tensor_cores(record):
    """A Triton ``tl.dot`` runs on tensor cores for fp16 / bf16 operands, and for fp32
    ones only in tf32 precision (an fp32 "ieee" dot is plain FMAs by design)."""
    if not record.get("uses_dot"):
        return False
    return record.get("dtype") != "fp32" or "tf32" in record.get("config", "")


def static_lines(records):
    """No register spills in any kernel config; tensor-core instructions wherever a
    Triton kernel's ``tl.dot`` should use them; every config compiles."""
    ok = [r for r in records if "error" not in r]
    errors = [r for r in records if "error" in r]
    spilling = [r for r in ok if (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0) > 0]
    no_tc = [r for r in ok if expects_tensor_cores(r) and not r.get("tensor_core_instructions")]
    lines = [f"{_verdict(not errors)} static: every kernel config compiles: "
             f"{len(ok)}/{len(records)} records"]
    lines += [f"       error: {r['kernel']} {r.get('arch')}: {r['error'].splitlines()[0][:160]}"
              for r in errors[:10]]
    lines.append(f"{_verdict(not spilling)} static: no register spills: "
                 f"{len(ok) - len(spilling)}/{len(ok)} configs")
    lines += [f"       spills: {r['kernel']} {r['arch']} {r.get('config', '')}: "
              f"{r['spill_stores']} stores / {r['spill_loads']} loads" for r in spilling[:20]]
    dots = [r for r in ok if expects_tensor_cores(r)]
    lines.append(f"{_verdict(not no_tc)} static: tensor-core instructions in every fp16 / bf16 / "
                 f"tf32 tl.dot kernel: {len(dots) - len(no_tc)}/{len(dots)} configs")
    lines += [f"       none in: {r['kernel']} {r['arch']}" for r in no_tc[:20]]
    cuda_mm = [r for r in ok if r.get("source") in CUDA_MATMUL_SOURCES]
    if cuda_mm:
        with_tc = [r for r in cuda_mm if r.get("tensor_core_instructions")]
        lines.append(f"{_verdict(len(with_tc) == len(cuda_mm))} static: tensor-core instructions "
                     f"in the CUDA C++ kernels that multiply matrices ({', '.join(CUDA_MATMUL_SOURCES)}):"
                     f" {len(with_tc)}/{len(cuda_mm)} kernels (the others multiply with FMAs; on GPUs the Triton kernels are "
                     "tried first)")
    return lines
