"""The benchmark report tool (``python -m benchmarks.report``) on a small synthetic pytest-benchmark
JSON, and the CPU peak-memory measure of the benchmark suite."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from benchmarks import report

DEVICE = "CPU Test Processor, 2 threads"
SLUG = "cpu-test-processor-2t"


def _bench(op, provider, mode, shape, data_s, *, dtype="float32", variant=None, **extra):
    ei = {
        "op": op, "provider": provider, "mode": mode, "shape": shape, "dtype": dtype, "device": DEVICE,
        "device_slug": SLUG, "floor_bytes": None, "floor_flops": None, "peak_mem_bytes": None, **extra,
    }  # fmt: skip
    if variant:
        ei["variant"] = variant
    data = sorted(data_s)
    n = len(data)
    stats = {"median": data[n // 2] if n % 2 else (data[n // 2 - 1] + data[n // 2]) / 2, "q1": data[0], "q3": data[-1]}
    stats.update(rounds=n, iterations=1, data=list(data_s))
    return {"group": f"{op} {shape} {dtype}", "name": f"test_{op}[{provider}-{mode}]", "extra_info": ei, "stats": stats}


def _doc(benchmarks, sizes="default"):
    mi = {
        "fastkd_bench": {
            "device": DEVICE, "device_slug": SLUG, "sizes": sizes, "torch": "2.13.0+cpu", "cuda": "none",
            "triton": "3.9.0", "fastkd": "0.1.0", "threads": 2, "copy_gbps": 10.0,
            "matmul_tflops": {"float32": 0.2},
        }
    }  # fmt: skip
    return {"machine_info": mi, "benchmarks": benchmarks}


def synthetic(sizes="default") -> dict:
    b = []
    # distill_loss over two V at N=4096: eager 3x and compile 2x fastkd's time; a floor in full mode
    for V, scale in ((1000, 1.0), (32000, 30.0)):
        shape = f"4096x{V}"
        for mode, f in (("forward", 0.4), ("full", 1.0)):
            kw = {"family": "tok", "floor_bytes": 3 * 4096 * V * 4 if mode == "full" else None}
            b.append(
                _bench("distill_loss", "eager", mode, shape, [0.030 * scale * f] * 5, peak_mem_bytes=6 * 2**20, **kw)
            )
            b.append(_bench("distill_loss", "compile", mode, shape, [0.020 * scale * f] * 5, **kw))
            b.append(
                _bench("distill_loss", "fastkd-cpu", mode, shape, [0.010 * scale * f] * 5, peak_mem_bytes=2**20, **kw)
            )
    # a second op with a non-numeric shape, a FLOP floor and a forward-only mode
    shape, flops = "L6 BT8192 Hs384 Ht768", 87 * 10**9
    b.append(_bench("hidden_match", "eager", "forward", shape, [0.5, 0.4, 0.6], floor_flops=flops))
    b.append(_bench("hidden_match", "fastkd-cpu", "forward", shape, [0.25, 0.2, 0.3], floor_flops=flops))
    # an entry without the fastkd fields is skipped, not a crash
    b.append({"group": "x", "name": "test_other", "extra_info": {}, "stats": {"median": 1.0}})
    return _doc(b, sizes)


def test_rows_from_json_times_quantiles_and_floor():
    doc = _doc(
        [_bench("distill_loss", "fastkd-cpu", "full", "10x100", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], floor_bytes=3 * 10**9)]
    )
    (row,) = report.rows_from_json(doc)
    assert row["median_ms"] == pytest.approx(3500.0)
    # numpy's linear-interpolation percentiles of 1..6: p20 = 2.0, p80 = 5.0
    assert row["p20_ms"] == pytest.approx(2000.0)
    assert row["p80_ms"] == pytest.approx(5000.0)
    assert row["quantiles"] == "p20/p80"
    # 3 GB in 3.5 s = 0.857 GB/s against a measured 10 GB/s copy bandwidth
    assert row["achieved_gbps"] == pytest.approx(3 / 3.5, rel=1e-3)
    assert row["pct_of_floor"] == pytest.approx(100 * 3 / 3.5 / 10, rel=1e-3)
    assert row["device_slug"] == SLUG and row["torch"] == "2.13.0+cpu" and row["sizes"] == "default"


def test_rows_from_json_flop_floor_and_skips_foreign_entries(capsys):
    rows = report.rows_from_json(synthetic())
    assert len(rows) == 14
    assert "test_other" in capsys.readouterr().err
    hm = next(r for r in rows if r["op"] == "hidden_match" and r["provider"] == "fastkd-cpu")
    # 87 GFLOP in 0.25 s = 0.348 TFLOP/s against a measured 0.2 TFLOP/s float32 matmul rate
    assert hm["achieved_tflops"] == pytest.approx(0.348, rel=1e-3)
    assert hm["pct_of_floor"] == pytest.approx(174.0, rel=1e-3)


def test_quantiles_fall_back_to_quartiles_without_data():
    doc = _doc([_bench("distill_loss", "eager", "full", "2x2", [1.0, 2.0, 3.0])])
    del doc["benchmarks"][0]["stats"]["data"]
    (row,) = report.rows_from_json(doc)
    assert row["quantiles"] == "q1/q3" and row["p20_ms"] == pytest.approx(1000.0)


def test_csv_round_trip_and_per_op_replacement(tmp_path):
    rows = report.rows_from_json(synthetic())
    paths = report.write_csvs(rows, tmp_path)
    assert sorted(p.name for p in paths) == ["distill_loss.csv", "hidden_match.csv"]
    assert all(p.parent == tmp_path / SLUG for p in paths)
    back = report.read_csvs(tmp_path / SLUG)
    assert len(back) == len(rows)
    eager = next(r for r in back if r["provider"] == "eager" and r["shape"] == "4096x32000" and r["mode"] == "full")
    assert eager["median_ms"] == pytest.approx(900.0)
    assert eager["peak_mem_bytes"] == 6 * 2**20
    with open(tmp_path / SLUG / "distill_loss.csv", newline="") as f:
        header = next(csv.reader(f))
    for col in ("op", "provider", "mode", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "device", "torch",
                "floor_bytes", "pct_of_floor", "peak_mem_bytes"):  # fmt: skip
        assert col in header
    # A new run of one op replaces that op's CSV and leaves the other op's CSV alone.
    new = report.rows_from_json(_doc([_bench("distill_loss", "eager", "full", "8x8", [0.001])]))
    report.write_csvs(new, tmp_path)
    back = report.read_csvs(tmp_path / SLUG)
    assert {(r["op"], r["shape"]) for r in back if r["op"] == "distill_loss"} == {("distill_loss", "8x8")}
    assert sum(r["op"] == "hidden_match" for r in back) == 2


def test_op_table_ratios_floor_and_memory():
    rows = [r for r in report.rows_from_json(synthetic()) if r["op"] == "distill_loss"]
    table = report.op_table(rows)
    lines = table.splitlines()
    assert lines[0].split("|")[1:-1] == [
        " case ", " mode ", " eager ", " compile ", " fastkd-cpu ", " fastkd vs eager ", " fastkd vs compile ",
        " % of floor (fastkd) ", " memory above inputs: fastkd / eager ",
    ]  # fmt: skip
    full = next(line for line in lines if line.startswith("| 4096x32000 float32 | full"))
    cells = [c.strip() for c in full.split("|")[1:-1]]
    assert cells[2:5] == ["900 ms", "600 ms", "300 ms"]
    assert cells[5:7] == ["3.00x", "2.00x"]
    # floor 3*4096*32000*4 B in 0.3 s = 5.24 GB/s of a 10 GB/s copy bandwidth
    assert cells[7] == "52%"
    assert cells[8] == "1.0 MiB / 6.0 MiB"
    # rows are ordered by V, then mode
    order = [line.split("|")[1].strip() + " " + line.split("|")[2].strip() for line in lines[2:]]
    assert order == [
        "4096x1000 float32 forward",
        "4096x1000 float32 full",
        "4096x32000 float32 forward",
        "4096x32000 float32 full",
    ]


def test_op_table_picks_the_fastest_fastkd_backend_and_liger():
    b = [
        _bench("distill_loss", "eager", "full", "16384x131072", [0.1], dtype="bfloat16"),
        _bench("distill_loss", "liger", "full", "16384x131072", [0.06], dtype="bfloat16"),
        _bench("distill_loss", "fastkd-cuda", "full", "16384x131072", [0.03], dtype="bfloat16"),
        _bench("distill_loss", "fastkd-triton", "full", "16384x131072", [0.02], dtype="bfloat16"),
    ]
    table = report.op_table(report.rows_from_json(_doc(b)))
    header, _, row = table.splitlines()
    assert "fastkd vs liger" in header and "fastest fastkd" in header and "compile" not in header
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[cells.index("5.00x") + 1] == "3.00x"  # vs eager 0.1/0.02, vs liger 0.06/0.02
    assert "triton" in cells


def test_main_writes_csv_readme_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    src = tmp_path / "run.json"
    src.write_text(json.dumps(synthetic()))
    out = tmp_path / "results"
    assert report.main([str(src), "--results-dir", str(out)]) == 0
    d = out / SLUG
    assert (d / "distill_loss.csv").is_file() and (d / "hidden_match.csv").is_file()
    pngs = sorted(p.name for p in d.glob("*.png"))
    assert pngs == ["distill_loss_float32_tok-n4096.png"]  # the only sweep with two sizes
    text = (d / "README.md").read_text()
    assert f"# fastkd benchmarks: {DEVICE}" in text
    assert "## distill_loss" in text and "## hidden_match" in text
    assert "![distill_loss_float32_tok-n4096](distill_loss_float32_tok-n4096.png)" in text
    assert "torch 2.13.0+cpu" in text and "bash benchmarks/run.sh" in text
    assert "smoke run" not in text
    # Without JSON the report regenerates the tables from the committed CSVs, identically.
    assert report.main(["--results-dir", str(out)]) == 0
    assert (d / "README.md").read_text() == text


def test_smoke_runs_and_busy_machines_are_marked():
    doc = synthetic(sizes="quick")
    doc["machine_info"]["fastkd_bench"].update(load_avg=7.5, cpu_count=2)
    text = report.device_readme(report.rows_from_json(doc))
    assert "smoke run" in text
    assert "load average at the start: 7.5 on 2 cores (**busy machine" in text
    doc["machine_info"]["fastkd_bench"].update(load_avg=0.2)
    assert "busy machine" not in report.device_readme(report.rows_from_json(doc))


def test_update_readme_between_markers(tmp_path):
    out = tmp_path / "results"
    report.write_csvs(report.rows_from_json(synthetic()), out)
    readme = tmp_path / "README.md"
    readme.write_text(f"# fastkd\n\nintro\n\n## Performance\n{report.BEGIN}\nold table\n{report.END}\n\n## License\n")
    report.update_readme(readme, out, modes=["full"])
    text = readme.read_text()
    assert text.startswith("# fastkd\n\nintro\n\n## Performance\n" + report.BEGIN)
    assert text.endswith(report.END + "\n\n## License\n")
    assert "old table" not in text
    section = text[text.index(report.BEGIN) : text.index(report.END)]
    assert f"### {DEVICE}" in section
    assert f"[results/{SLUG}/](results/{SLUG}/)" in section  # relative to the README's folder
    assert "| 4096x32000 float32 | full |" in section and "| forward |" in section  # hidden_match: forward only
    assert "4096x32000 float32 | forward" not in section  # distill_loss: only the full mode
    report.update_readme(readme, out, modes=["full"])
    assert readme.read_text() == text  # idempotent
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        report.update_readme(readme, out)


def test_format_helpers():
    assert report.fmt_time(0.0123) == "12.3 µs"
    assert report.fmt_time(12.3) == "12.3 ms"
    assert report.fmt_time(2345.0) == "2.35 s"
    assert report.fmt_ratio(0.004) == "0.004x"
    assert report.fmt_bytes(3 * 2**30) == "3.00 GiB"
    assert report.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_cpu_peak_memory_measure_counts_what_a_call_allocates():
    torch = pytest.importorskip("torch")
    from benchmarks import common

    if common.IS_CUDA:
        pytest.skip("the CPU measure is checked on CPU")
    n = 16 * 2**20  # 64 MiB of float32

    def target():
        x = torch.ones(n)
        y = x * 2  # a second buffer alive at the same time
        del x, y
        z = torch.ones(n)  # reuses freed memory: the peak stays at two buffers
        del z

    mem = common.measure_peak(None, target)
    if mem.extra_bytes is None:
        pytest.skip(f"no peak-memory measure on this kernel: {mem.method}")
    # two buffers (one would be 64 MiB), within a few MiB: RSS-based, so pages the process gave back
    # while the call ran (seen under load: 0.4 MiB) can come off the count
    assert 2 * 4 * n - 4 * 2**20 <= mem.extra_bytes < 2 * 4 * n + 16 * 2**20


def test_other_helpers_conventions(tmp_path):
    """Cases written without benchmarks/common.py: list shapes, a ``case`` name, a bare "cpu" device,
    the matmul rate in FLOP/s, and no device rates in the case (the session's are used)."""
    b = []
    for case in ("target", "momentum"):
        for provider, t in (("eager", 0.03), ("fastkd-cpu", 0.01)):
            e = _bench("embedding_ascent_", provider, "forward", [64, 128, 768], [t], floor_bytes=10**8, case=case)
            e["extra_info"].update(device="cpu", shape=[64, 128, 768])
            del e["extra_info"]["device_slug"]
            e["group"] = f"embedding_ascent_ {case} [64, 128, 768] float32"
            b.append(e)
    h = _bench("hidden_match", "fastkd-cpu", "full", "L=6 B=16 T=512", [0.5], floor_flops=10**11, floor_bytes=10**9)
    h["extra_info"].update(device="cpu", matmul_flops_per_s=4e11)
    b.append(h)
    rows = report.rows_from_json(_doc(b))
    emb = [r for r in rows if r["op"] == "embedding_ascent_"]
    assert {r["shape"] for r in emb} == {"64x128x768"}
    assert {r["variant"] for r in emb} == {"target", "momentum"}
    assert all(r["device"] == DEVICE and r["device_slug"] == SLUG for r in rows)
    fk = next(r for r in emb if r["provider"] == "fastkd-cpu")
    assert fk["pct_of_floor"] == pytest.approx(100.0)  # 1e8 B in 10 ms = 10 GB/s of the session's 10 GB/s
    hm = next(r for r in rows if r["op"] == "hidden_match")
    # roofline: max(1e9 B / 10 GB/s, 1e11 FLOP / 0.4 TFLOP/s) = 0.25 s of the 0.5 s median
    assert hm["matmul_tflops"] == pytest.approx(0.4) and hm["pct_of_floor"] == pytest.approx(50.0)
    assert hm["floor_bound"] == "flops" and hm["achieved_gbps"] == pytest.approx(2.0)
    # the two embedding cases of the same shape stay apart in the CSV and the table
    report.write_csvs(rows, tmp_path)
    back = report.read_csvs(tmp_path / SLUG)
    assert sum(r["op"] == "embedding_ascent_" for r in back) == 4
    table = report.op_table([r for r in back if r["op"] == "embedding_ascent_"])
    assert "| momentum 64x128x768 float32 | forward | 30 ms | 10 ms | 3.00x | 100% |" in table
    assert "| target 64x128x768 float32 | forward |" in table


def test_bad_json_is_a_clear_error(tmp_path):
    bad = tmp_path / "empty.json"
    bad.write_text("")
    with pytest.raises(SystemExit, match=r"empty\.json: cannot read a pytest-benchmark JSON"):
        report.main([str(bad), "--results-dir", str(tmp_path / "r")])


def test_readme_performance_section_is_regenerated_from_the_committed_results():
    """The README's tables are exactly what the report command makes of the committed CSVs."""
    root = Path(report.__file__).resolve().parent.parent
    text = (root / "README.md").read_text(encoding="utf-8")
    i, j = text.find(report.BEGIN), text.find(report.END)
    assert 0 <= i < j, "README.md lost its benchmark markers"
    expected = report.readme_section(report.RESULTS_DIR, ("full",), relative_to=root)
    assert text[i + len(report.BEGIN) : j].strip() == expected.strip(), (
        "README.md's performance section is stale: run `python -m benchmarks.report --update-readme README.md`"
    )


def test_op_table_prefers_the_paired_eager_ratio_and_says_so(tmp_path):
    paired = {"paired_vs_eager": 1.25, "paired_p20": 1.2, "paired_p80": 1.3, "paired_blocks": 40}
    b = [
        _bench("distill_loss", "eager", "full", "64x3", [100e-6] * 5, family="cls"),
        # separate medians say 0.80x; the interleaved timing of the same run says 1.25x
        _bench("distill_loss", "fastkd-cpu", "full", "64x3", [125e-6] * 5, family="cls", **paired),
    ]
    rows = report.rows_from_json(_doc(b))
    table = report.op_table(rows)
    line = next(x for x in table.splitlines() if x.startswith("| 64x3 float32 | full"))
    assert [c.strip() for c in line.split("|")[1:-1]][4] == "1.25x" + report.PAIRED_MARK
    assert report.PAIRED_NOTE in table
    # the paired fields survive the CSV round trip the README tables are regenerated from
    report.write_csvs(rows, tmp_path)
    again = report.read_csvs(tmp_path / SLUG)
    assert report.op_table(again) == table
    # without a paired figure: the ratio of the medians, no footnote
    rows[1]["paired_vs_eager"] = None
    plain = report.op_table(rows)
    assert "0.80x" in plain and report.PAIRED_NOTE not in plain


def test_paired_ratio_measures_a_known_ratio():
    import time

    from benchmarks.common import paired_ratio

    def spin(seconds):
        def f():
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                pass

        return f

    ratio, lo, hi, blocks = paired_ratio(spin(100e-6), spin(200e-6), budget_s=0.3, block_s=0.002)
    assert blocks >= 20 and lo <= ratio <= hi
    assert 1.6 < ratio < 2.4  # baseline twice as slow
