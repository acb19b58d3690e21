"""Render the README's results section from the files in ``benchmarks/results``.

``python benchmarks/report.py`` rewrites the block between the README's results markers
from ``traffic.json``, ``static_report.json``, every ``timings_<device>.csv`` and the
``*.targets.txt`` checks; ``--check`` only says whether the README is up to date (a test
runs it, so the published figures cannot drift from the data). ``python -m benchmarks``
calls it after a run that wrote to ``benchmarks/results``.
"""
import argparse
import glob
import json
import os
import sys

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness, targets  # noqa: E402

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
_MB = 1e6


def _range(values, fmt="{:.2f}"):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else \
        f"{fmt.format(lo)} – {fmt.format(hi)}"


def _table(head, rows):
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _details(summary, lines):
    return ["<details><summary>" + summary + "</summary>", ""] + lines + ["", "</details>"]


def _load_json(results, name):
    path = os.path.join(results, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _ratio(r, key, base):
    return r[key] / r[base] if r.get(key) and r.get(base) else None


# ------------------------------------------------------------------ traffic


def traffic_section(records):
    ok = [r for r in records if "error" not in r]
    failed = [r for r in records if "error" in r]
    rows = []
    for op in harness.OPS:
        for p in ("fwd", "bwd"):
            sel = [r for r in ok if r["op"] == op and r["pass"] == p]
            if not sel:
                continue
            shapes = {r["model"] for r in records if r["op"] == op and r["pass"] == p}
            rows.append([f"`{op}`", p, f"{len(sel)}/{len(shapes)}",
                         _range([_ratio(r, "fused_bytes", "compulsory_bytes") for r in sel]),
                         _range([_ratio(r, "fused_unique_bytes", "compulsory_bytes") for r in sel]),
                         _range([_ratio(r, "naive_bytes", "compulsory_bytes") for r in sel]),
                         _range([_ratio(r, "naive_bytes", "fused_unique_bytes") for r in sel]),
                         _range([r.get("model_h100_naive_over_fused") for r in sel]),
                         _range([r.get("model_h100_naive_over_fused_cached") for r in sel])])
    full = []
    for r in records:
        if "error" in r:
            fused = ["no fused figure", "", ""]
        else:
            fused = [f"{r['fused_bytes'] / _MB:.2f}", f"{r['fused_unique_bytes'] / _MB:.2f}",
                     f"{r['model_h100_fused_cached_s'] * 1e6:.1f}"]
        full.append([f"`{r['op']}`", r["model"], r["pass"], r["shape"],
                     f"{r['compulsory_bytes'] / _MB:.2f}", fused[0], fused[1],
                     f"{r['naive_bytes'] / _MB:.2f}", f"{r['flops'] / 1e9:.3f}", fused[2],
                     f"{r['model_h100_naive_s'] * 1e6:.1f}"])
    lines = ["### Memory traffic", "",
             f"{len(records)} records (`traffic.json`), one per model shape and pass, "
             f"{records[0]['dtype'] if records else ''}, per image at batch 1. Fused bytes are "
             "counted in the Triton interpreter twice: every element a load or store touches "
             "(no cache: overlapping stencil taps and re-read K/V blocks all count) and each "
             "address once (a perfect cache); a GPU's DRAM traffic lies between the two. "
             "Naive bytes are the aten ops' inputs and outputs (dispatch mode); compulsory "
             "is every input read once and every output written once. Ranges are over the "
             "op's model shapes. The H100 columns are a roofline **model** "
             "(max(bytes / 3.35 TB/s, FLOPs / 990 TFLOP/s)), not a measurement.", ""]
    lines += _table(["operator", "pass", "shapes with a fused figure", "fused / compulsory, "
                     "no cache", "fused / compulsory, perfect cache", "naive / compulsory",
                     "naive / fused (perfect cache)", "model H100 naive / fused, no cache",
                     "model H100 naive / fused, perfect cache"], rows)
    if failed:
        lines += ["", f"No fused figure at {len(failed)} records: "
                  f"{failed[0]['error'].splitlines()[0]}"]
    lines += [""] + _details(
        "Every shape: MB per image, GFLOP, modelled H100 µs",
        _table(["operator", "model", "pass", "shape", "compulsory MB", "fused MB (no cache)",
                "fused MB (perfect cache)", "naive MB", "GFLOP", "model H100 fused µs "
                "(perfect cache)", "model H100 naive µs"], full))
    return lines


# ------------------------------------------------------------------ static


def _kernel_group(r):
    if r["backend"] == "triton":
        return "triton", f"`kernels/{r['module'].rsplit('.', 1)[-1]}.py`"
    return "cuda", f"`csrc/{r.get('source', r['kernel'])}`"


def static_section(records):
    groups = {}
    for r in records:
        groups.setdefault(_kernel_group(r) + (r.get("arch", "-"),), []).append(r)
    rows = []
    for (backend, where, arch), recs in groups.items():
        ok = [r for r in recs if "error" not in r]
        spills = sum((r.get("spill_stores") or 0) + (r.get("spill_loads") or 0) for r in ok)
        if backend == "triton":
            dots = [r for r in ok if targets.expects_tensor_cores(r)]
            tc = f"{sum(1 for r in dots if r.get('tensor_core_instructions'))}/{len(dots)}"
            occupancy = _range([r.get("occupancy_warps") for r in ok], "{:.0f}")
        else:
            tc, occupancy = f"{sum(1 for r in ok if r.get('tensor_core_instructions'))}/–", "–"
        rows.append([backend, where, arch, f"{len(ok)}/{len(recs)}",
                     _range([r.get("registers") for r in ok], "{:.0f}"),
                     _range([r.get("shared_bytes", 0) / 1024 for r in ok], "{:.1f}"),
                     spills, tc, occupancy])
    lines = ["### Static compile report", "",
             f"{len(records)} records (`static_report.json`): every Triton kernel config "
             "(compiled by Triton for sm_80 and sm_90a, read back with cuobjdump) and every "
             "CUDA kernel (nvcc `-Xptxas -v`, SASS from cuobjdump). Registers are per thread, "
             "shared memory per block, occupancy in resident warps per SM. Tensor-core "
             "configs count the configs with HMMA / HGMMA instructions among those whose "
             "`tl.dot` should use them (fp16 / bf16 operands, or fp32 in tf32); the CUDA "
             "C++ kernels are FMA-only by design (their source also runs under the CPU host "
             "emulation), so they have none.", ""]
    return lines + _table(["backend", "kernels", "arch", "configs compiled",
                           "registers", "shared KiB", "spill stores + loads",
                           "tensor-core configs", "occupancy (warps/SM)"], rows)


# ------------------------------------------------------------------ timings


_NUMERIC = ("median_ms", "speedup_vs_naive", "peak_mem_mb")  # the CSV fields used here


def _float(value):
    return float(value) if value not in (None, "") else None


def timings_section(path):
    rows = [dict(r, **{k: _float(r.get(k)) for k in _NUMERIC})
            for r in harness.latest_case_rows(path)]
    if not rows:
        return []
    device, dtype = rows[0]["device"], rows[0]["dtype"]
    runs = sorted({r["run_id"] for r in rows})
    by = {(r["op"], r["model"], r["batch"], r["provider"], r["pass"]): r for r in rows}
    summary, full = [], []
    for op in harness.OPS:
        providers = list(dict.fromkeys(r["provider"] for r in rows
                                       if r["op"] == op and r["provider"] != harness.NAIVE))
        cases = list(dict.fromkeys((r["model"], r["batch"]) for r in rows if r["op"] == op))
        for prov in providers:
            cells = [f"`{op}`", prov]
            for p in harness.PASSES:
                ratios = [by[(op, m, b, prov, p)]["speedup_vs_naive"]
                          for m, b in cases if (op, m, b, prov, p) in by]
                ratios = [v for v in ratios if v]
                cells.append(f"{harness.geomean(ratios):.2f} ({_range(ratios)})"
                             if ratios else "–")
            peaks = []
            for m, b in cases:
                mine, naive = (by.get((op, m, b, who, "full")) for who in (prov, harness.NAIVE))
                if mine and naive and mine["peak_mem_mb"] and naive["peak_mem_mb"]:
                    peaks.append(mine["peak_mem_mb"] / naive["peak_mem_mb"])
            cells.insert(2, str(len(cases)))
            summary.append(cells + [_range(peaks)])
        for m, b in cases:
            for prov in [harness.NAIVE] + providers:
                got = [by.get((op, m, b, prov, p)) for p in harness.PASSES]
                if not any(got):
                    continue
                status = next(g["status"] for g in got if g)
                times = [f"{g['median_ms']:.3f}" if g and g["median_ms"] else "–" for g in got]
                speed = got[2] and got[2]["speedup_vs_naive"]
                full.append([f"`{op}`", m, b, prov, *times,
                             f"{speed:.2f}" if speed else "–",
                             f"{got[2]['peak_mem_mb']:.1f}"
                             if got[2] and got[2]["peak_mem_mb"] else "–", status])
    name = os.path.basename(path)
    lines = [f"### Timings: {device}", "",
             f"`{name}`, {dtype}, run {', '.join(runs)}: the newest run of each case. "
             "naive / provider per pass (geometric mean over the op's model shapes, range in "
             "brackets; > 1 is faster than the naive composition), measured side by side "
             "in one run (on CPU from the fastest of interleaved rounds, since preemption only adds "
             "time; on a GPU from the medians); peak is the provider's peak memory over "
             "naive's (fwd+bwd).", ""]
    lines += _table(["operator", "provider", "shapes", "fwd", "bwd", "fwd+bwd",
                     "peak / naive peak"], summary)
    lines += [""] + _details(
        "Every shape: median ms per pass", _table(
            ["operator", "model", "batch", "provider", "fwd ms", "bwd ms", "fwd+bwd ms",
             "naive / provider (fwd+bwd)", "peak MB (fwd+bwd)", "status"], full))
    return lines


# ------------------------------------------------------------------ targets


def missed_section(results):
    lines = []
    for path in sorted(glob.glob(os.path.join(results, "*.targets.txt"))):
        with open(path) as f:
            got = [line.rstrip() for line in f if line.startswith(("MET", "MISSED"))]
        lines += [f"- {line.split(None, 1)[0]}: {line.split(None, 1)[1]} "
                  f"(`{os.path.basename(path)}`)" for line in got]
    if not lines:
        return []
    return ["### Targets", "", "Every target check of the files above, with the figure it "
            "judged; the shapes behind each MISSED are in "
            "`benchmarks/results/summary_<device>.md`.", ""] + lines


def render(results=harness.RESULTS_DIR):
    lines = [BEGIN, "<!-- generated by `python benchmarks/report.py` from benchmarks/results: "
             "edit those, not this -->", ""]
    traffic = _load_json(results, "traffic.json")
    if traffic:
        lines += traffic_section(traffic) + [""]
    static = _load_json(results, "static_report.json")
    if static:
        lines += static_section(static) + [""]
    for path in sorted(glob.glob(os.path.join(results, "timings_*.csv"))):
        lines += timings_section(path) + [""]
    lines += missed_section(results) + ["", END]
    return "\n".join(lines) + "\n"


def splice(text, block):
    """``text`` with its results block replaced by ``block``."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README has no results block ({BEGIN!r} ... {END!r})")
    return text[:start] + block + text[end + len(END) + 1:]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python benchmarks/report.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=harness.RESULTS_DIR)
    parser.add_argument("--readme", default=README)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when the README's results block is not what the data gives")
    args = parser.parse_args(argv)
    with open(args.readme) as f:
        text = f.read()
    new = splice(text, render(args.results))
    if args.check:
        if new != text:
            print(f"{args.readme}: results block is out of date; run python benchmarks/report.py")
            return 1
        return 0
    with open(args.readme, "w") as f:
        f.write(new)
    print(f"{args.readme}: results block rewritten from {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
