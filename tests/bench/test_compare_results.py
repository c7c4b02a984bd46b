"""Pure logic of the vLLM comparison (bench/compare/results.py, report.py): no servers are started."""

from __future__ import annotations

import pytest

from bench.compare import report, results


def vllm_result(ttfts, itls, latencies, output_lens, errors=None, duration=10.0):
    errors = errors if errors is not None else [""] * len(ttfts)
    done = sum(1 for e in errors if not e)
    return {"duration": duration, "completed": done, "failed": len(errors) - done,
            "request_throughput": done / duration, "output_throughput": sum(output_lens) / duration,
            "ttfts": ttfts, "itls": itls, "latencies": latencies, "output_lens": output_lens, "errors": errors}


def test_percentile_interpolates_like_numpy():
    assert results.percentile([], 50) is None
    assert results.percentile([3.0], 99) == 3.0
    assert results.percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert results.percentile(list(range(101)), 99) == pytest.approx(99.0)
    assert results.percentile([10.0, 0.0, 5.0], 100) == 10.0


def test_summary_ignores_failed_requests():
    # The failed request has TTFT 0 and no ITLs in vLLM's result; it must not pull the medians down.
    r = vllm_result(ttfts=[0.1, 0.3, 0.0], itls=[[0.02, 0.04], [0.06], []], latencies=[0.16, 0.36, 0.0],
                    output_lens=[3, 2, 0], errors=["", "", "Too Many Requests"])
    s = results.summarize_vllm_bench(r)
    assert s["completed"] == 2 and s["failed"] == 1
    assert s["ttft_ms_p50"] == pytest.approx(200.0)
    assert s["itl_ms_p50"] == pytest.approx(40.0)
    # TPOT = (latency - ttft) / (tokens - 1): 30 ms and 60 ms
    assert s["tpot_ms_p50"] == pytest.approx(45.0)


def test_steady_point_ratios_and_targets():
    v = [{"output_throughput": 100.0, "request_throughput": 1.0, "ttft_ms_p50": 100.0, "itl_ms_p50": 40.0,
          "tpot_ms_p50": 40.0, "ttft_ms_p99": 200.0, "itl_ms_p99": 80.0, "failed": 0}] * 2
    m = [dict(v[0], output_throughput=90.0, ttft_ms_p50=104.0, itl_ms_p50=44.0),
         dict(v[0], output_throughput=110.0, ttft_ms_p50=106.0, itl_ms_p50=40.0, failed=1)]
    point = results.steady_point(4, v, m)
    assert point["rounds"] == 2
    assert point["output_throughput"] == {"vllm": 100.0, "mesh": 100.0, "ratio": 1.0}
    assert point["ttft_ms_p50"]["ratio"] == pytest.approx(1.05)
    assert point["itl_ms_p50"]["ratio"] == pytest.approx(1.05)
    assert point["failed"] == {"vllm": 0, "mesh": 1}
    assert results.steady_targets(point) == {"throughput >= 1.0x": True, "median TTFT <= 1.05x": True,
                                             "median ITL <= 1.05x": True}
    slower = results.steady_point(4, v, [dict(v[0], output_throughput=95.0, ttft_ms_p50=120.0)])
    t = results.steady_targets(slower)
    assert t["throughput >= 1.0x"] is False and t["median TTFT <= 1.05x"] is False
    assert results.ratio(1.0, 0.0) is None and results.ratio(None, 2.0) is None


def outcome(start, status=200, ttft=None, completed=False, status_s=0.01, error=""):
    return {"start": start, "status": status, "status_s": status_s, "ttft_s": ttft, "end_s": None,
            "tokens": 64 if completed else 0, "completed": completed, "error": error}


def test_goodput_counts_completed_within_slo_per_second_of_window():
    outcomes = [outcome(0.0, ttft=0.5, completed=True), outcome(0.1, ttft=1.99, completed=True),
                outcome(0.2, ttft=2.0, completed=True),  # exactly the SLO: not good
                outcome(0.3, ttft=7.0, completed=True),
                outcome(0.4, status=429, status_s=0.004), outcome(0.5, status=429, status_s=0.012),
                outcome(0.6, status=503, status_s=0.9), outcome(0.7, status=200, error="error event in the stream: x"),
                outcome(0.8, status=0, error="cut off after the drain period", status_s=None)]
    s = results.overload_summary(outcomes, seconds=2.0, slo_s=2.0, rate=4.5)
    assert s["sent"] == 9 and s["completed"] == 4 and s["good"] == 2
    assert s["goodput_rps"] == pytest.approx(1.0)
    assert s["completed_within_slo"] == pytest.approx(0.5)
    assert s["ttft_ms_p99"] == pytest.approx(results.percentile([0.5, 1.99, 2.0, 7.0], 99) * 1000)
    assert s["refused_429"] == 2
    assert s["refusal_ms_p50"] == pytest.approx(8.0)
    assert s["refusal_ms_max"] == pytest.approx(12.0)
    assert s["other_failures"] == {"HTTP 503": 1, "error event in the stream: x": 1,
                                   "cut off after the drain period": 1}
    assert s["other_http_error_ms_p50"] == pytest.approx(900.0)  # only the 503 has an HTTP error status


def test_overload_targets():
    vllm = {"goodput_rps": 1.0, "ttft_ms_p99": 30000.0}
    assert results.overload_targets(vllm, {"goodput_rps": 2.5, "ttft_ms_p99": 1500.0}) == {
        "goodput >= 2x": True, "p99 TTFT of admitted within SLO": True}
    assert results.overload_targets(vllm, {"goodput_rps": 1.5, "ttft_ms_p99": 2500.0}) == {
        "goodput >= 2x": False, "p99 TTFT of admitted within SLO": False}
    assert results.overload_targets({"goodput_rps": 0.0, "ttft_ms_p99": None},
                                    {"goodput_rps": 1.0, "ttft_ms_p99": None})["goodput >= 2x"] is None


def test_tables_render_every_point():
    point = results.steady_point(16, [{k: 1.0 for k in results.STEADY_KEYS} | {"failed": 0}],
                                 [{k: 2.0 for k in results.STEADY_KEYS} | {"failed": 0}])
    table = results.steady_table([point])
    lines = table.splitlines()
    assert len(lines) == 3 and lines[2].startswith("| 16 | 1 |")
    assert lines[0].count("|") == lines[2].count("|")
    s = results.overload_summary([outcome(0.0, ttft=0.5, completed=True)], seconds=1.0)
    overload = results.overload_table(s, s)
    assert "| goodput req/s | 1 | 1 | 1 |" in overload


def test_markdown_keeps_hand_written_notes():
    doc = {"command": "python -m bench --quick", "machine": {"cores": 2, "cpu": "x", "memory_gib": 1,
           "platform": "p", "python": "3", "vllm": "v", "torch": "t"}, "sides": {"vllm": "a", "mesh": "b"}}
    first = report.markdown(doc)
    assert report.NOTES_MARK in first and "python -m bench --quick" in first
    edited = first + "\nWhere the time goes: the frontend.\n"
    again = report.markdown(doc, edited)
    assert again.endswith("Where the time goes: the frontend.\n")
