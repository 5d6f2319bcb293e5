"""Turn pytest-benchmark JSON into fastkd's benchmark results: CSV, Markdown tables, PNG plots.

Usage::

    python -m benchmarks.report RUN.json [RUN2.json ...]     # write benchmarks/results/<device>/
    python -m benchmarks.report                              # regenerate tables/plots from the CSVs
    python -m benchmarks.report --update-readme README.md    # embed the tables in the README

For each device (``device_slug``) it writes into ``benchmarks/results/<device>/``:

* ``<op>.csv`` — one row per case: op, variant, provider, mode, shape, dtype, median/p20/p80 (ms),
  rounds, device, versions, floor bytes/FLOPs, achieved GB/s or TFLOP/s and % of the floor,
  peak and extra memory. A JSON that holds an op replaces that op's CSV; other ops' CSVs stay.
* ``README.md`` — per op, a table per case and mode with each provider's median time and the
  ratios fastkd vs eager, vs torch.compile and vs Liger (provider time / fastest fastkd backend's
  time: above 1 means fastkd is faster), the % of floor and the extra memory.
* ``<op>[_<variant>]_<dtype>_<family>.png`` — time vs the last dimension (e.g. V) per provider,
  log-log, one panel per mode, for every sweep with at least two sizes (needs matplotlib).

``--update-readme FILE`` replaces the text between ``<!-- bench:begin -->`` and
``<!-- bench:end -->`` in FILE with the tables of every device folder (``--readme-modes`` picks the
modes shown there; a case with none of them shows all of its modes).

The report reads these fields from each benchmark's ``extra_info``
(op, provider, mode, shape, dtype, device, floor_bytes, floor_flops, peak_mem_bytes: the peak
memory one call adds above its inputs) plus, when present, variant (or case), family,
input_bytes, copy_gbps, matmul_tflops (or matmul_flops_per_s), sweep_x and sweep_name, so any
``bench_<op>.py`` that follows the convention is handled. % of floor is the roofline fraction:
max(floor_bytes / copy bandwidth, floor_flops / matmul rate) / median time.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
COMMAND = "bash benchmarks/run.sh"
MODE_ORDER = {"forward": 0, "backward": 1, "full": 2}
PROVIDER_ORDER = ["eager", "compile", "liger", "fastkd-cpu", "fastkd-cuda", "fastkd-triton"]
BASELINES = ("eager", "compile", "liger")
PAIRED_MARK = "†"
PAIRED_NOTE = (
    f"{PAIRED_MARK} timed interleaved with eager in the same process (blocks of calls alternating, median of "
    "the block ratios; `benchmarks/common.py` paired_ratio), not as the ratio of the two medians: at a fraction "
    "of a millisecond per call the machine's drift between two separate runs exceeds the difference measured."
)

FIELDS = [
    "op", "variant", "provider", "mode", "shape", "dtype", "family", "group",
    "median_ms", "p20_ms", "p80_ms", "quantiles", "rounds", "iterations",
    "device", "device_slug", "sizes", "load_avg", "cpu_count", "torch", "cuda", "triton", "fastkd", "threads",
    "cpu_isa", "floor_bytes", "floor_flops", "copy_gbps", "matmul_tflops",
    "achieved_gbps", "achieved_tflops", "pct_of_floor",
    "input_bytes", "peak_mem_bytes", "mem_method", "floor_bound", "sweep_x", "sweep_name",
    "paired_vs_eager", "paired_p20", "paired_p80", "paired_blocks",
]  # fmt: skip
_NUMERIC = {
    "median_ms", "p20_ms", "p80_ms", "rounds", "iterations", "threads", "load_avg", "cpu_count", "floor_bytes", "floor_flops",
    "copy_gbps", "matmul_tflops", "achieved_gbps", "achieved_tflops", "pct_of_floor", "input_bytes",
    "peak_mem_bytes", "sweep_x", "paired_vs_eager", "paired_p20", "paired_p80", "paired_blocks",
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# JSON -> rows
# --------------------------------------------------------------------------------------------
def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "unknown"


def _percentile(sorted_data: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of sorted data, q in [0, 100]."""
    if len(sorted_data) == 1:
        return sorted_data[0]
    pos = (len(sorted_data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_data) - 1)
    return sorted_data[lo] + (sorted_data[hi] - sorted_data[lo]) * (pos - lo)


def _num(v):
    if v is None or v == "":
        return None
    if isinstance(v, (int, float)):
        return v
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return int(f) if f.is_integer() and "." not in str(v) and "e" not in str(v).lower() else f


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def _derive(row: dict) -> dict:
    """Achieved rates and the roofline fraction from the median and the measured device rates: the
    floor time is max(floor_bytes / copy bandwidth, floor_flops / matmul rate)."""
    med_s = row["median_ms"] / 1e3 if row.get("median_ms") else None
    row["achieved_gbps"] = row["achieved_tflops"] = row["pct_of_floor"] = None
    row["floor_bound"] = ""
    if not med_s:
        return row
    bounds = []
    if row.get("floor_bytes"):
        row["achieved_gbps"] = _sig(row["floor_bytes"] / med_s / 1e9)
        if row.get("copy_gbps"):
            bounds.append((row["floor_bytes"] / (row["copy_gbps"] * 1e9), "bytes"))
    if row.get("floor_flops"):
        row["achieved_tflops"] = _sig(row["floor_flops"] / med_s / 1e12)
        if row.get("matmul_tflops"):
            bounds.append((row["floor_flops"] / (row["matmul_tflops"] * 1e12), "flops"))
    if bounds:
        floor_s, kind = max(bounds)
        row["pct_of_floor"] = _sig(100.0 * floor_s / med_s)
        row["floor_bound"] = kind
    return row


def _shape_str(shape) -> str:
    if isinstance(shape, (list, tuple)):
        return "x".join(str(d) for d in shape)
    return str(shape)


def rows_from_json(data: dict) -> list[dict]:
    """One CSV row per benchmark of a pytest-benchmark JSON document."""
    mi = (data.get("machine_info") or {}).get("fastkd_bench") or {}
    rows = []
    for b in data.get("benchmarks", []):
        ei = dict(b.get("extra_info") or {})
        st = b.get("stats") or {}
        op = ei.get("op") or (b.get("group") or b.get("name", "?")).split()[0]
        if "provider" not in ei or "mode" not in ei or "median" not in st:
            print(f"report: skipping {b.get('name')!r}: no provider/mode in extra_info or no stats", file=sys.stderr)
            continue
        data_pts = sorted(st.get("data") or [])
        if data_pts:
            p20, p80, quant = _percentile(data_pts, 20), _percentile(data_pts, 80), "p20/p80"
        else:
            p20, p80, quant = st.get("q1"), st.get("q3"), "q1/q3"
        matmul = ei.get("matmul_tflops")
        if matmul is None and ei.get("matmul_flops_per_s"):
            matmul = ei["matmul_flops_per_s"] / 1e12
        if matmul is None and isinstance(mi.get("matmul_tflops"), dict):
            matmul = mi["matmul_tflops"].get(ei.get("dtype"))
        row = {
            "op": op,
            "variant": str(ei.get("variant") or ei.get("case") or ""),
            "group": b.get("group") or "",
            "provider": ei["provider"],
            "mode": ei["mode"],
            "shape": _shape_str(ei.get("shape", "")),
            "dtype": str(ei.get("dtype", "")),
            "family": ei.get("family") or "",
            "median_ms": st["median"] * 1e3,
            "p20_ms": None if p20 is None else p20 * 1e3,
            "p80_ms": None if p80 is None else p80 * 1e3,
            "quantiles": quant,
            "rounds": st.get("rounds"),
            "iterations": st.get("iterations"),
            # The session's description of the machine wins over a case's short "cpu" / "cuda".
            "device": mi.get("device") or ei.get("device") or "unknown",
            "device_slug": mi.get("device_slug") or ei.get("device_slug") or slugify(ei.get("device") or "unknown"),
            "sizes": mi.get("sizes", ""),
            "load_avg": mi.get("load_avg"),
            "cpu_count": mi.get("cpu_count"),
            "torch": ei.get("torch") or mi.get("torch", ""),
            "cuda": ei.get("cuda") or mi.get("cuda", ""),
            "triton": ei.get("triton") or mi.get("triton", ""),
            "fastkd": ei.get("fastkd") or mi.get("fastkd", ""),
            "threads": ei.get("threads") or mi.get("threads"),
            "cpu_isa": ei.get("cpu_isa") or mi.get("cpu_isa", ""),
            "floor_bytes": ei.get("floor_bytes"),
            "floor_flops": ei.get("floor_flops"),
            "copy_gbps": ei.get("copy_gbps") or mi.get("copy_gbps"),
            "matmul_tflops": matmul,
            "input_bytes": ei.get("input_bytes"),
            "peak_mem_bytes": ei.get("peak_mem_bytes"),
            "mem_method": ei.get("mem_method", ""),
            "sweep_x": ei.get("sweep_x"),
            "sweep_name": ei.get("sweep_name", ""),
            "paired_vs_eager": ei.get("paired_vs_eager"),
            "paired_p20": ei.get("paired_p20"),
            "paired_p80": ei.get("paired_p80"),
            "paired_blocks": ei.get("paired_blocks"),
        }
        rows.append(_derive(row))
    return rows


# --------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------
def _fmt_csv(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _key(r: dict) -> tuple:
    return (r["op"], r.get("group", ""), r.get("variant", ""), r["provider"], r["mode"], r["shape"], r["dtype"])


def write_csvs(rows: Iterable[dict], results_dir: Path = RESULTS_DIR) -> list[Path]:
    """Write ``<results_dir>/<device_slug>/<op>.csv``; each op's file is replaced by the new rows."""
    by_file: dict[Path, dict[tuple, dict]] = defaultdict(dict)
    for r in rows:
        by_file[Path(results_dir) / r["device_slug"] / f"{r['op']}.csv"][_key(r)] = r  # later wins
    written = []
    for path, rs in sorted(by_file.items()):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in sorted(rs.values(), key=_sort_key):
                w.writerow({k: _fmt_csv(r.get(k)) for k in FIELDS})
        written.append(path)
    return written


def read_csvs(device_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(Path(device_dir).glob("*.csv")):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not {"op", "provider", "shape"} <= set(reader.fieldnames or ()):
                continue  # another tool's CSV (e.g. the demo's results table), not a benchmark
            for r in reader:
                rows.append({k: (_num(v) if k in _NUMERIC else (v or "")) for k, v in r.items()})
    return rows


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def _dims(shape: str) -> list[int] | None:
    parts = re.split(r"[x×,]", str(shape))
    try:
        return [int(p) for p in parts]
    except ValueError:
        return None


def _shape_sort(shape: str):
    d = _dims(shape)
    if d is not None:
        return (0, d[:-1], d[-1], "")
    nums = [int(n) for n in re.findall(r"\d+", str(shape))]
    return (1, nums, 0, str(shape))


def _sort_key(r: dict):
    return (
        r["op"], r.get("variant", ""), r["dtype"], r.get("family", ""), _shape_sort(r["shape"]),
        MODE_ORDER.get(r["mode"], 9), _provider_rank(r["provider"]),
    )  # fmt: skip


def _provider_rank(p: str) -> tuple:
    return (PROVIDER_ORDER.index(p), p) if p in PROVIDER_ORDER else (len(PROVIDER_ORDER), p)


def fmt_time(ms: float | None) -> str:
    if ms is None:
        return "–"
    if ms < 1:
        return f"{ms * 1e3:.1f} µs"
    if ms < 1000:
        return f"{ms:.3g} ms" if ms < 100 else f"{ms:.0f} ms"
    return f"{ms / 1e3:.3g} s"


def fmt_ratio(r: float) -> str:
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.2g}x"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "–"
    mib = b / 2**20
    if mib >= 1024:
        return f"{mib / 1024:.2f} GiB"
    return f"{mib:.1f} MiB" if mib >= 0.1 else f"{b / 1024:.0f} KiB"


def best_fastkd(times: dict[str, dict]) -> tuple[str | None, dict | None]:
    cands = [(r["median_ms"], p) for p, r in times.items() if p.startswith("fastkd-") and r.get("median_ms")]
    if not cands:
        return None, None
    _, p = min(cands)
    return p, times[p]


def cases(rows: Iterable[dict]) -> dict[tuple, dict[str, dict]]:
    """``{(op, variant, dtype, family, shape, group, mode): {provider: row}}`` in display order."""
    out: dict[tuple, dict[str, dict]] = {}
    for r in sorted(rows, key=_sort_key):
        k = (r["op"], r.get("variant", ""), r["dtype"], r.get("family", ""), r["shape"], r.get("group", ""), r["mode"])
        out.setdefault(k, {})[r["provider"]] = r
    return out


def op_table(rows: list[dict], modes: Sequence[str] | None = None) -> str:
    """The Markdown table of one op's cases (times per provider, ratios, % of floor, memory)."""
    cs = cases(rows)
    if modes:
        shown_cases = {k[:-1] for k in cs if k[-1] in modes}
        cs = {k: v for k, v in cs.items() if k[-1] in modes or k[:-1] not in shown_cases}
    providers = sorted({p for v in cs.values() for p in v}, key=_provider_rank)
    baselines = [b for b in BASELINES if b in providers]
    n_fastkd = sum(p.startswith("fastkd-") for p in providers)
    head = ["case", "mode", *providers]
    head += [f"fastkd vs {b}" for b in baselines]
    if n_fastkd > 1:
        head.append("fastest fastkd")
    has_floor = any(r.get("floor_bytes") or r.get("floor_flops") for v in cs.values() for r in v.values())
    if has_floor:
        head.append("% of floor (fastkd)")
    head.append("memory above inputs: fastkd / eager")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|"]
    paired = False
    for (_op, variant, dtype, _family, shape, _group, mode), by_p in cs.items():
        name, fk = best_fastkd(by_p)
        case = f"{variant + ' ' if variant else ''}{shape} {dtype}"
        cells = [case, mode]
        for p in providers:
            cells.append(fmt_time(by_p[p]["median_ms"]) if p in by_p else "–")
        for b in baselines:
            if b == "eager" and fk and fk.get("paired_vs_eager"):
                cells.append(fmt_ratio(fk["paired_vs_eager"]) + PAIRED_MARK)
                paired = True
            elif fk and b in by_p and by_p[b].get("median_ms"):
                cells.append(fmt_ratio(by_p[b]["median_ms"] / fk["median_ms"]))
            else:
                cells.append("–")
        if n_fastkd > 1:
            cells.append(name.removeprefix("fastkd-") if name else "–")
        pct = fk.get("pct_of_floor") if fk else None
        if has_floor:
            cells.append("–" if pct is None else (f"{pct:.0f}%" if pct >= 10 else f"{pct:.2g}%"))
        em_f = fk.get("peak_mem_bytes") if fk else None
        em_e = by_p["eager"].get("peak_mem_bytes") if "eager" in by_p else None
        cells.append(f"{fmt_bytes(em_f)} / {fmt_bytes(em_e)}")
        lines.append("| " + " | ".join(cells) + " |")
    if paired:
        lines.append("")
        lines.append(PAIRED_NOTE)
    return "\n".join(lines)


def _meta(rows: list[dict]) -> dict:
    first = rows[0]
    keys = (
        "device",
        "device_slug",
        "torch",
        "cuda",
        "triton",
        "fastkd",
        "threads",
        "sizes",
        "load_avg",
        "cpu_count",
        "cpu_isa",
    )
    meta = {k: first.get(k) for k in keys}
    meta["copy_gbps"] = next((r["copy_gbps"] for r in rows if r.get("copy_gbps")), None)
    mm = {}
    for r in rows:
        if r.get("matmul_tflops"):
            mm.setdefault(r["dtype"], r["matmul_tflops"])
    meta["matmul"] = mm
    return meta


def meta_lines(rows: list[dict]) -> list[str]:
    m = _meta(rows)
    lines = [
        f"- device: **{m['device']}**; torch {m['torch']} (CUDA {m['cuda'] or 'none'}), triton {m['triton']}, "
        f"fastkd {m['fastkd']}; {m['threads']} torch threads"
        + (f"; fastkd CPU kernels at instruction-set level {m['cpu_isa']}" if m.get("cpu_isa") else ""),
        f"- command: `{COMMAND}` (size set `{m['sizes'] or '?'}`), then `python -m benchmarks.report`",
    ]
    if m["sizes"] == "quick":
        lines.insert(0, "- **smoke run (quick size set, tiny shapes): not benchmark results**")
    if m.get("load_avg") not in (None, ""):
        busy = m.get("cpu_count") and m["load_avg"] > 0.5 * m["cpu_count"]
        lines.append(
            f"- load average at the start: {m['load_avg']} on {m.get('cpu_count') or '?'} cores"
            + (" (**busy machine: timings distorted**)" if busy else "")
        )
    rates = []
    if m["copy_gbps"]:
        rates.append(f"copy bandwidth {m['copy_gbps']:.1f} GB/s")
    rates += [f"{dt} matmul {v:.3g} TFLOP/s" for dt, v in sorted(m["matmul"].items())]
    if rates:
        lines.append("- measured in the same run: " + ", ".join(rates))
    return lines


LEGEND = (
    'Times are medians of the timed rounds (p20/p80 in the CSVs). "fastkd vs X" = X\'s time / the '
    "fastest fastkd backend's time (above 1: fastkd is faster). % of floor = the case's floor (bytes "
    "that must move, or FLOPs) per second against the measured copy bandwidth (or matmul rate). "
    "Memory above inputs = the peak memory one call adds to what was allocated before it. "
    "Above 100% of floor: the rates are a float32 copy through main memory and a float32 matmul, "
    "so a case whose data stays in cache, or that does its arithmetic in int8 (nearest_tokens on "
    "CPU ranks with an exact int8 GEMM), can beat them. The fused losses (distill_loss, "
    "hidden_match) write their gradients during the forward pass, so their forward includes most "
    "of the backward work and their backward only scales: compare `full`."
)


def device_readme(rows: list[dict], plots: Sequence[Path] = ()) -> str:
    by_op: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_op[r["op"]].append(r)
    m = _meta(rows)
    out = [f"# fastkd benchmarks: {m['device']}", "", *meta_lines(rows), "", LEGEND, ""]
    for op in sorted(by_op):
        out += [f"## {op}", "", op_table(by_op[op]), ""]
        op_plots = [p for p in plots if p.name.startswith(op + "_")]
        if op_plots:
            out += [f"![{p.stem}]({p.name})" for p in op_plots] + [""]
    return "\n".join(out)


def readme_section(
    results_dir: Path = RESULTS_DIR, modes: Sequence[str] | None = ("full",), relative_to: Path | None = None
) -> str:
    """The text put between the README's markers: every device folder's tables (links relative to
    ``relative_to``, the README's folder)."""
    out = [
        "<!-- generated by `python -m benchmarks.report --update-readme README.md`; edit benchmarks/report.py -->",
        "",
    ]
    devices = sorted(p for p in Path(results_dir).iterdir() if p.is_dir() and read_csvs(p))
    if not devices:
        return "\n".join([*out, "No benchmark results committed yet.", ""])
    for d in devices:
        rows = read_csvs(d)
        if not rows:
            continue
        m = _meta(rows)
        link = Path(os.path.relpath(Path(d).resolve(), Path(relative_to or Path.cwd()).resolve())).as_posix()
        notes = [
            f"- how this run was made (where not by the command above) and what it found: [{link}/NOTES.md]({link}/NOTES.md)"
        ]
        out += [f"### {m['device']}", "", *meta_lines(rows), *(notes if (Path(d) / "NOTES.md").is_file() else []),
                f"- all cases, CSVs and plots: [{link}/]({link}/)", ""]  # fmt: skip
        by_op: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            by_op[r["op"]].append(r)
        for op in sorted(by_op):
            out += [f"**{op}**", "", op_table(by_op[op], modes), ""]
    out += [LEGEND, ""]
    return "\n".join(out)


def update_readme(readme: Path, results_dir: Path = RESULTS_DIR, modes: Sequence[str] | None = ("full",)) -> None:
    text = Path(readme).read_text(encoding="utf-8")
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < 0 or j < i:
        raise SystemExit(f"report: {readme} has no {BEGIN} ... {END} markers (add them where the tables go)")
    section = readme_section(results_dir, modes, relative_to=Path(readme).resolve().parent)
    new = text[: i + len(BEGIN)] + "\n" + section + text[j:]
    Path(readme).write_text(new, encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------
def _sweep(r: dict) -> tuple[str, float, str] | None:
    """(family key, x, x label) of a row, or None when its shape is not part of a sweep."""
    if r.get("sweep_x") not in (None, ""):
        return (r.get("family") or "sweep", float(r["sweep_x"]), r.get("sweep_name") or "size")
    d = _dims(r["shape"])
    if d is None or len(d) < 1:
        return None
    lead = "x".join(map(str, d[:-1]))
    fam = "-".join(x for x in (r.get("family"), f"N{lead}" if lead else "") if x)
    return (fam or "sweep", float(d[-1]), "last dimension (V)")


def make_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per (op, variant, dtype, family) sweep with >= 2 sizes; panels per mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report: matplotlib is not installed, no plots (pip install matplotlib)", file=sys.stderr)
        return []
    groups: dict[tuple, list[tuple[dict, float, str]]] = defaultdict(list)
    for r in rows:
        sw = _sweep(r)
        if sw is None or not r.get("median_ms"):
            continue
        fam, x, label = sw
        groups[(r["op"], r.get("variant", ""), r["dtype"], fam)].append((r, x, label))
    paths = []
    for (op, variant, dtype, fam), items in sorted(groups.items()):
        if len({x for _, x, _ in items}) < 2:
            continue
        modes = sorted({r["mode"] for r, _, _ in items}, key=lambda m: MODE_ORDER.get(m, 9))
        fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            by_p: dict[str, list[tuple[float, float]]] = defaultdict(list)
            for r, x, _ in items:
                if r["mode"] == mode:
                    by_p[r["provider"]].append((x, r["median_ms"]))
            for p in sorted(by_p, key=_provider_rank):
                pts = sorted(by_p[p])
                ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=p)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(mode)
            ax.set_xlabel(items[0][2])
            ax.set_ylabel("median time (ms)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{op}{' ' + variant if variant else ''} {dtype} {fam} — {items[0][0]['device']}")
        fig.tight_layout()
        name = "_".join(re.sub(r"[^a-z0-9_]+", "-", x.lower()).strip("-") for x in (op, variant, dtype, fam) if x)
        name += ".png"
        path = out_dir / name
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def regenerate(device_dir: Path, plots: bool = True) -> Path:
    rows = read_csvs(device_dir)
    if plots:
        for old in Path(device_dir).glob("*.png"):
            old.unlink()
        pngs = make_plots(rows, Path(device_dir))
    else:  # keep (and link) the plots already there
        pngs = sorted(Path(device_dir).glob("*.png"))
    readme = Path(device_dir) / "README.md"
    readme.write_text(device_readme(rows, pngs), encoding="utf-8")
    return readme


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="*", type=Path, help="pytest-benchmark JSON files (--benchmark-json)")
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="default: benchmarks/results")
    ap.add_argument("--update-readme", type=Path, metavar="README", help="replace the text between the bench markers")
    ap.add_argument(
        "--readme-modes", default="full", help="comma list of modes in the README tables (default: full; 'all')"
    )
    ap.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    args = ap.parse_args(argv)

    devices: set[Path] = set()
    for path in args.json:
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"report: {path}: cannot read a pytest-benchmark JSON document ({e})") from e
        rows = rows_from_json(doc)
        if not rows:
            print(f"report: {path}: no fastkd benchmark cases", file=sys.stderr)
        for p in write_csvs(rows, args.results_dir):
            devices.add(p.parent)
            print(f"wrote {p}")
    if not args.json and args.results_dir.is_dir():
        devices = {p for p in args.results_dir.iterdir() if p.is_dir() and read_csvs(p)}
    for d in sorted(devices):
        print(f"wrote {regenerate(d, plots=not args.no_plots)}")
    if args.update_readme:
        modes = None if args.readme_modes == "all" else [m.strip() for m in args.readme_modes.split(",") if m.strip()]
        update_readme(args.update_readme, args.results_dir, modes)
        print(f"updated {args.update_readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
