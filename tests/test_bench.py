"""The transport benchmark: ``--quick`` runs end to end and writes results worth reading."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import _report
from bench._measure import REQUIRED_FIELDS, make_record
from tests.test_caltech101 import make_folder

ROOT = Path(__file__).resolve().parents[1]
NUMERIC_FIELDS = ("payload_bytes", "chunk_bytes", "gbps_median", "gbps_min", "gbps_max")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _no_constants(name: str) -> Any:
    raise ValueError(f"JSON holds {name}, which is not JSON")


def check_record(record: dict[str, Any]) -> None:
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    assert not missing, f"{record} lacks {missing}"
    for key in ("suite", "transport", "variant"):
        assert isinstance(record[key], str) and record[key], record
    for key in (*NUMERIC_FIELDS, "ratio_to_tcp"):
        value = record[key]
        assert isinstance(value, int | float) and not isinstance(value, bool), (key, record)
        assert math.isfinite(value) and value > 0, (key, record)
    assert record["gbps_min"] <= record["gbps_median"] <= record["gbps_max"], record
    assert record["chunk_bytes"] <= record["payload_bytes"], record


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench") / "results"
    proc = subprocess.run(
        [
            sys.executable,
            "-W",
            "always::ResourceWarning",
            "-m",
            "bench.transport",
            "--quick",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,  # about 90 s here; a bound on a hang, not a timing
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ResourceWarning" not in proc.stderr, proc.stderr[-3000:]
    return out, proc.stdout


def test_quick_run_writes_valid_json(quick_run: tuple[Path, str]) -> None:
    out, _ = quick_run
    doc = json.loads((out / _report.JSON_NAME).read_text(), parse_constant=_no_constants)
    assert doc["machine"]["cpus"] >= 1 and doc["machine"]["python"]
    assert {"numpy", "pyzmq", "libzmq", "grpcio", "protobuf", "msgpack"} <= set(doc["packages"])
    records = doc["records"]
    assert records
    for record in records:
        check_record(record)
    assert {"ceiling", "zmq", "grpc", "framing", "dsgd", "ps", "apply", "secure"} <= {
        r["suite"] for r in records
    }
    assert {"memcpy", "tcp", "zmq-tcp", "zmq-ipc", "grpc"} <= {r["transport"] for r in records}
    chunks = {r["chunk_bytes"] for r in records if r["suite"] == "zmq"}
    assert len(chunks) >= 3  # a sweep, not one point
    assert doc["best_chunk"]["chunk_bytes"] in chunks
    assert doc["best_chunk"]["transport"] == "zmq-tcp"
    assert doc["tcp_ceiling_gbps"] > 0
    ps = [r for r in records if r["suite"] == "ps"]
    assert {r["workers"] for r in ps} >= {1, 2} and all(r["pushes_per_s"] > 0 for r in ps)
    assert {r["shards"] for r in ps} == {1, 2}
    assert not any(r["chunks_not_applied"] for r in ps)  # every pushed chunk was applied
    paths = {r["path"] for r in records if r["suite"] == "dsgd"}
    assert {"push dense float32", "fetch full range", "push sparse 1%"} <= paths
    # every secured path is measured beside the same path in the clear, and still correct
    secured = [r for r in records if r["suite"] == "secure" and "ratio_to_plain" in r]
    assert {r["transport"] for r in secured} == {
        "zmq-tcp",
        "zmq-ipc",
        "grpc aio unary",
        "grpc aio client stream",
        "dsgd cycle",
    }
    assert all(r["ratio_to_plain"] > 0 for r in secured)
    assert all(r["correct"] for r in records if r["transport"] == "dsgd cycle")
    # each target is judged in every run (at --quick sizes, only as a smoke test)
    assert len(doc["targets"]) == 4
    for target in doc["targets"]:
        assert isinstance(target["met"], bool) and math.isfinite(target["value"])


def test_quick_run_writes_markdown_and_chart_and_names_the_best_chunk(
    quick_run: tuple[Path, str],
) -> None:
    out, stdout = quick_run
    assert (out / _report.CHUNKS_PNG).read_bytes().startswith(PNG_MAGIC)
    markdown = (out / _report.MARKDOWN_NAME).read_text()
    assert "## Headline" in markdown and "| zmq-tcp |" in markdown
    assert "fastest chunk size for ZeroMQ tcp" in stdout
    assert "DEFAULT_CHUNK_BYTES" in stdout
    assert (out / _report.PS_PNG).read_bytes().startswith(PNG_MAGIC)
    assert (out / "transport_dsgd.png").read_bytes().startswith(PNG_MAGIC)
    assert (out / "transport_secure.png").read_bytes().startswith(PNG_MAGIC)
    assert "targets (ratios within this run" in stdout


def _synthetic_records() -> list[dict[str, Any]]:
    mib = 1 << 20
    records = [
        make_record("ceiling", "tcp", _report.TCP_REUSED_VARIANT, 8 * mib, c, [0.004, 0.005])
        for c in (mib, 8 * mib)
    ]
    records.append(make_record("ceiling", "memcpy", _report.MEMCPY_REUSED, 8 * mib, mib, [0.0005]))
    records.extend(
        make_record("ps", "zmq-tcp", "dense push", 8 * mib, mib, [0.01 * n], workers=n)
        for n in (1, 2, 4)
    )
    return records


def test_report_draws_ps_throughput_vs_workers_when_a_suite_yields_ps_records(
    tmp_path: Path,
) -> None:
    records = _synthetic_records()
    _report.fill_ratios(records)
    doc = {
        "created_utc": "now",
        "config": {"payload_bytes": 8 << 20, "warmup": 1, "repeats": 2, "quick": True},
        "machine": {"machine": "x86_64", "cpus": 2, "python": "3.11"},
        "packages": {"numpy": "2"},
        "tcp_ceiling_gbps": _report.tcp_ceiling(records),
        "tcp_reference_gbps": {},
        "best_chunk": {},
        "best_per_transport": _report.best_per_transport(records),
        "records": records,
    }
    written = _report.write_all(doc, tmp_path)
    assert tmp_path / _report.PS_PNG in written
    assert (tmp_path / _report.PS_PNG).read_bytes().startswith(PNG_MAGIC)
    assert "| workers |" in (tmp_path / _report.MARKDOWN_NAME).read_text()
    for record in records:
        check_record(record)
    # without a reference of their own, ratios divide by the best raw-TCP median
    assert records[-1]["ratio_to_tcp"] == pytest.approx(
        records[-1]["gbps_median"] / doc["tcp_ceiling_gbps"]
    )


def test_the_caltech_benchmark_measures_a_standalone_loop_and_a_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A few seconds of each on a generated folder of the official layout: every figure
    the benchmark reports is there and means what it says."""
    monkeypatch.setenv("DSGD_CACHE", str(tmp_path / "cache"))
    root = make_folder(tmp_path / "data", per_category=12)
    out = tmp_path / "out"
    argv = ["--data", str(root), "--image-size", "16", "--seconds", "6", "--warmup", "0"]
    argv += ["--eval-every", "1"]
    argv += ["--runs", "standalone", "1w-1%-fp16", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.caltech", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((out / "caltech.json").read_text())
    assert (out / "caltech.png").stat().st_size > 10_000
    standalone, cluster = doc["records"]
    assert standalone["run"] == "standalone" and standalone["steps_per_second"] > 0
    assert standalone["train_seconds"] >= 6 and standalone["curve"][0]["steps"] == 0
    assert cluster["run"] == "1w-1%-fp16" and cluster["steps"] > 0
    # the bench ended the run 6 s after its first step (start-up not counted), so it
    # polled a training cluster for at least that long
    assert cluster["steps_per_second"] > 0
    assert 0 < cluster["push_ratio_to_dense"] < 0.2  # 1% of the entries, float16 + indices
    assert cluster["curve"]  # (seconds_to_first_step is None when no 1 s poll saw a step)
    assert cluster["seconds_to_first_step"] is None or cluster["seconds_to_first_step"] > 0
    assert set(cluster["peak_rss_mb"]) == {"coordinator", "shard0", "worker0", "evaluator"}
    rows = {row["run"]: row for row in doc["rows"]}
    assert rows["standalone"]["ratio_to_standalone"] == 1.0
    expected = cluster["steps_per_second"] / standalone["steps_per_second"]
    assert rows["1w-1%-fp16"]["ratio_to_standalone"] == pytest.approx(expected)


def test_time_to_a_fixed_accuracy_counts_training_from_the_first_step(tmp_path: Path) -> None:
    """DistBelief's Figure 5 figure: the standalone loop's curve counts training time only,
    a dsgd run's counts from the coordinator's start, so its start-up comes off; a run that
    never reached the accuracy has no time and is said to."""
    from bench import caltech

    def record(run: str, first: float, curve: list[tuple[float, float]]) -> dict[str, Any]:
        points = [{"seconds": s, "steps": 0, "accuracy": a} for s, a in curve]
        return {
            "run": run,
            "steps_per_second": 2.0,
            "seconds_to_first_step": first,
            "best_accuracy": max(a for _, a in curve),
            "train_seconds": curve[-1][0],
            "peak_rss_mb": {"x": 1.0},
            "curve": points,
        }

    standalone = record("standalone", 7.0, [(0.0, 0.01), (60.0, 0.3), (120.0, 0.45)])
    cluster = record("1w-1%", 12.0, [(10.0, 0.01), (100.0, 0.35), (190.0, 0.41)])
    stuck = record("2w-1%", 15.0, [(20.0, 0.01), (300.0, 0.2)])
    assert caltech.training_seconds_to(standalone, 0.4) == 120.0
    assert caltech.training_seconds_to(cluster, 0.4) == 178.0  # 190 s less 12 s of start-up
    assert caltech.training_seconds_to(stuck, 0.4) is None
    rows = {r["run"]: r for r in caltech.aggregate([standalone, cluster, stuck], 0.4)}
    assert rows["1w-1%"]["training_seconds_to_target"] == 178.0
    assert rows["2w-1%"]["reached_target_runs"] == 0
    doc = {"target_accuracy": 0.4, "records": [standalone, cluster, stuck]}
    (tmp_path / "in.json").write_text(json.dumps(doc))
    assert caltech.main(["--replot", str(tmp_path / "in.json"), "--out", str(tmp_path)]) == 0
    redone = json.loads((tmp_path / "caltech.json").read_text())
    assert redone["rows"][1]["training_seconds_to_target"] == 178.0
    assert (tmp_path / "caltech.png").read_bytes().startswith(PNG_MAGIC)


def test_the_cycle_benchmark_checks_that_no_update_is_lost_or_doubled(tmp_path: Path) -> None:
    """A short run of the pull-push cycle against dsgd's shards (plain and secured with
    CURVE) and the plain-TCP reference: every server applied exactly the acknowledged
    pushes, and the ratios are theirs."""
    out = tmp_path / "cycle.json"
    argv = ["--params", "50000", "--workers", "2", "--shards", "2", "--seconds", "1", "--secure"]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.ps_cycle", *argv, "--warmup", "0.5", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    for server in ("dsgd", "tcp", "dsgd_curve"):
        figures = doc[server]
        assert figures["head_exact"] and figures["pushes_match"], figures
        assert figures["shard_pushes"] == [sum(figures["acknowledged"])] * 2
        assert figures["pulls"] > 0 and figures["cycles_per_s"] > 0
    assert doc["ratio"] == pytest.approx(doc["dsgd"]["cycles_per_s"] / doc["tcp"]["cycles_per_s"])
    curve = doc["dsgd_curve"]["cycles_per_s"] / doc["dsgd"]["cycles_per_s"]
    assert doc["curve_ratio"] == pytest.approx(curve)


def test_shaped_link_rows_divide_each_step_time_by_the_unshaped_links(tmp_path: Path) -> None:
    from bench import shaped_links

    def record(link: str, run: str, seconds: float, moved: float) -> dict[str, Any]:
        return {
            "link": link,
            "run": run,
            "step_seconds": seconds,
            "bytes_per_step": moved,
            "gradient_seconds_per_step": 0.5,
            "exchange_seconds_per_step": seconds - 0.5,
        }

    records = [
        record("bridge", "dense", 1.0, 6e8),
        record("1gbit", "dense", 5.0, 6e8),
        record("1gbit", "dense", 7.0, 6e8),
        record("bridge", "1%-fp16", 0.8, 9e6),
        record("1gbit", "1%-fp16", 0.9, 9e6),
    ]
    rows = {(r["link"], r["run"]): r for r in shaped_links.with_ratios(records)}
    assert rows["1gbit", "dense"]["step_seconds"] == 6.0
    assert rows["1gbit", "dense"]["step_time_x_bridge"] == 6.0
    assert rows["1gbit", "dense"]["repeats"] == 2
    assert rows["1gbit", "1%-fp16"]["step_time_x_bridge"] == pytest.approx(0.9 / 0.8)
    assert rows["bridge", "dense"]["step_time_x_bridge"] == 1.0
    shaped_links.plot(list(rows.values()), tmp_path / "links.png")
    assert (tmp_path / "links.png").read_bytes().startswith(PNG_MAGIC)


def test_the_failover_model_says_how_many_steps_of_each_worker_every_chunk_holds() -> None:
    """bench.failover's exactness check: each worker's fixed gradient is what the real
    worker computes from its partition, and solving parameters for the steps they hold
    finds one step too many (or too few) in the chunk it touched, and a value no whole
    number of steps makes."""
    from bench._fixed_gradient import (
        LR,
        applied_steps,
        expected_params,
        fixed_gradient,
        worker_gradient,
    )
    from dsgd.model import CompiledModel

    spec = fixed_gradient(params=1000, workers=3)
    compiled = CompiledModel(spec, 1)
    for w in range(3):
        x, y = spec.dataset.partition(w, 3)
        _, grad = compiled.gradient(compiled.initial_flat(), x[:1], y[:1])
        assert np.array_equal(grad, worker_gradient(w, 1000)), w
    bounds = [(0, 400), (400, 800), (800, 1000)]
    params = expected_params({0: 5, 1: 7, 2: 11}, 1000)
    assert applied_steps(params, 3, bounds) == [[5, 7, 11]] * 3
    params[400:800] -= np.float32(LR) * worker_gradient(1, 400, 400)  # applied twice
    params[800:] += np.float32(LR) * worker_gradient(2, 200, 800)  # lost
    assert applied_steps(params, 3, bounds) == [[5, 7, 11], [5, 8, 11], [5, 7, 10]]
    params[3] += np.float32(LR / 2)
    assert applied_steps(params, 3, bounds)[0] is None
