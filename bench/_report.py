"""Turning transport-benchmark records into ratios, a headline, JSON, markdown and charts."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench._common import pyplot, write_json
from bench._measure import REQUIRED_FIELDS, MiB, Record, human_bytes

# The ceilings every chart draws and every ratio refers to.
TCP_REUSED_VARIANT = "recv_into one reused buffer"
TCP_FRESH_VARIANT = "recv_into a fresh buffer per chunk"
MEMCPY_REUSED = "numpy copy into a reused buffer"
MEMCPY_FRESH = "numpy copy into a fresh buffer per chunk"

JSON_NAME = "transport.json"
MARKDOWN_NAME = "transport.md"
CHUNKS_PNG = "transport_chunks.png"
PS_PNG = "transport_ps.png"
# Suites that sweep something other than the chunk size draw their own charts.
NOT_CHUNK_SWEEPS = frozenset({"ps", "dsgd", "apply"})


def _best(records: Iterable[Record]) -> Record | None:
    return max(records, key=lambda r: r["gbps_median"], default=None)


def _select(records: Iterable[Record], **match: Any) -> list[Record]:
    return [r for r in records if all(r.get(k) == v for k, v in match.items())]


def tcp_ceiling(records: list[Record]) -> float:
    """The best raw-TCP median of the run: what ``ratio_to_tcp`` divides by."""
    best = _best(_select(records, suite="ceiling", transport="tcp", variant=TCP_REUSED_VARIANT))
    if best is None:
        raise ValueError("no raw-TCP ceiling record; the ceiling suite must run")
    return float(best["gbps_median"])


def memcpy_ceiling(records: list[Record]) -> float | None:
    """The best numpy copy of the run (reused or fresh buffer, any chunk size)."""
    copies = [
        r
        for r in _select(records, suite="ceiling", transport="memcpy")
        if r["variant"] in (MEMCPY_REUSED, MEMCPY_FRESH)
    ]
    best = _best(copies)
    return None if best is None else float(best["gbps_median"])


def tcp_references(records: list[Record]) -> dict[str, float]:
    """Each suite's raw-TCP reference median (measured in the same rounds as the suite)."""
    return {
        r["suite"]: float(r["tcp_reference_gbps"]) for r in records if "tcp_reference_gbps" in r
    }


def fill_ratios(records: list[Record]) -> None:
    """Give records that lack one a ``ratio_to_tcp``: to their own reference if they carry
    ``tcp_reference_gbps``, else to the ceiling suite's reference (or best raw TCP)."""
    fallback = tcp_references(records).get("ceiling") or tcp_ceiling(records)
    for record in records:
        if not math.isfinite(record.get("ratio_to_tcp", math.nan)):
            reference = record.get("tcp_reference_gbps") or fallback
            record["ratio_to_tcp"] = record["gbps_median"] / reference


def best_chunk(records: list[Record], key: tuple[str, str, str], default: int) -> dict[str, Any]:
    """The fastest chunk size of one (suite, transport, variant), and how dsgd's default
    chunk size compares with it (``default_within_spread``: their min..max ranges overlap)."""
    suite, transport, variant = key
    group = _select(records, suite=suite, transport=transport, variant=variant)
    best = _best(group)
    if best is None:
        return {}
    result = {
        "suite": suite,
        "transport": transport,
        "variant": variant,
        "chunk_bytes": best["chunk_bytes"],
        "gbps_median": best["gbps_median"],
        "ratio_to_tcp": best["ratio_to_tcp"],
        "default_chunk_bytes": default,
    }
    at_default = _select(group, chunk_bytes=default)
    if at_default:
        d = at_default[0]
        result["default_gbps_median"] = d["gbps_median"]
        result["default_vs_best"] = d["gbps_median"] / best["gbps_median"]
        result["default_within_spread"] = d["gbps_max"] >= best["gbps_min"]
    return result


def best_per_transport(records: list[Record]) -> list[dict[str, Any]]:
    """For every (suite, transport), its fastest record."""
    keys = dict.fromkeys((r["suite"], r["transport"]) for r in records)
    out = []
    for suite, transport in keys:
        best = _best(_select(records, suite=suite, transport=transport))
        assert best is not None
        out.append({k: best[k] for k in REQUIRED_FIELDS if k != "payload_bytes"})
    return out


def one_line(record: Record) -> str:
    workers = f" workers={record['workers']}" if "workers" in record else ""
    return (
        f"{record['transport']:8s} {human_bytes(record['chunk_bytes']):>8s} "
        f"{record['gbps_median']:6.2f} GB/s ({record['gbps_min']:.2f}-{record['gbps_max']:.2f})"
        f"{workers}  {record['variant']}"
    )


def chunks_vs_one_frame(
    records: list[Record], series: Iterable[tuple[str, str, str, str]]
) -> list[dict[str, Any]]:
    """For each ``(label, suite, transport, variant)``: its speed in chunks of about 1 MiB
    and as one frame of the whole payload. With the fresh-vs-reused pairs this is the
    page-fault story in numbers: small fresh buffers are recycled by malloc (already
    faulted, often still in cache), a payload-sized fresh buffer is faulted in every time."""
    out = []
    for label, suite, transport, variant in series:
        group = _select(records, suite=suite, transport=transport, variant=variant)
        if not group:
            continue
        near_1mib = min(group, key=lambda r: (abs(r["chunk_bytes"] - MiB), r["chunk_bytes"]))
        one_frame = max(group, key=lambda r: r["chunk_bytes"])
        if one_frame["chunk_bytes"] != one_frame["payload_bytes"]:
            continue
        out.append(
            {
                "label": label,
                "chunk_bytes": near_1mib["chunk_bytes"],
                "chunked_gbps": near_1mib["gbps_median"],
                "frame_bytes": one_frame["chunk_bytes"],
                "one_frame_gbps": one_frame["gbps_median"],
            }
        )
    return out


def headline(doc: dict[str, Any]) -> str:
    records = doc["records"]
    lines = [f"raw TCP ceiling (best of the chunk sweep): {doc['tcp_ceiling_gbps']:.2f} GB/s"]
    memcpy = memcpy_ceiling(records)
    if memcpy is not None:
        lines[0] += f"; memcpy ceiling (best numpy copy): {memcpy:.2f} GB/s"
    references = doc.get("tcp_reference_gbps") or {}
    if references:
        lines.append(
            "raw TCP reference, 1 MiB chunks, timed alongside each suite (ratios divide by it): "
            + ", ".join(f"{suite} {gbps:.2f}" for suite, gbps in references.items())
            + " GB/s"
        )
    lines.append("best per transport (GB/s median, x raw TCP):")
    lines.extend(
        f"- {b['suite']}/{b['transport']}: {b['gbps_median']:.2f} GB/s "
        f"({b['ratio_to_tcp']:.2f}x) at {human_bytes(b['chunk_bytes'])}, {b['variant']}"
        for b in doc["best_per_transport"]
    )
    faults = doc.get("chunks_vs_one_frame") or []
    if faults:
        lines.append("chunks vs one payload-sized frame (fresh vs reused memory):")
        lines.extend(
            f"- {f['label']}: {human_bytes(f['chunk_bytes'])} chunks {f['chunked_gbps']:.2f} "
            f"GB/s, one {human_bytes(f['frame_bytes'])} frame {f['one_frame_gbps']:.2f} GB/s"
            for f in faults
        )
    best = doc.get("best_chunk") or {}
    if best:
        lines.append(
            f"fastest chunk size for ZeroMQ tcp, msgpack header + raw frames: "
            f"{human_bytes(best['chunk_bytes'])} ({best['gbps_median']:.2f} GB/s, "
            f"{best['ratio_to_tcp']:.2f}x raw TCP)"
        )
        default = human_bytes(best["default_chunk_bytes"])
        if "default_vs_best" not in best:
            verdict = "not measured in this run"
        elif best["chunk_bytes"] == best["default_chunk_bytes"]:
            verdict = "the fastest"
        else:
            spread = "within" if best["default_within_spread"] else "outside"
            verdict = (
                f"{best['default_vs_best']:.0%} of the fastest ({spread} the run-to-run spread)"
            )
        lines.append(f"dsgd's default chunk (dsgd.wire.DEFAULT_CHUNK_BYTES = {default}): {verdict}")
    targets = doc.get("targets") or []
    if targets:
        quick = (doc.get("config") or {}).get("quick")
        lines.append(
            "targets (ratios within this run"
            + (
                "; --quick sizes are smaller than the targets', so only a smoke test"
                if quick
                else ""
            )
            + "):"
        )
        lines.extend(
            f"- {t['what']}: {t['value']:.2f} (target {t['target']}): "
            + ("met" if t["met"] else "MISSED")
            for t in targets
        )
    return "\n".join(lines)


def markdown(doc: dict[str, Any]) -> str:
    machine, config = doc["machine"], doc["config"]
    packages = ", ".join(f"{k} {v}" for k, v in doc["packages"].items())
    out = [
        "# Transport benchmark",
        "",
        f"{doc['created_utc']}; {machine.get('cpu_model', machine['machine'])}, "
        f"{machine['cpus']} CPUs, Python {machine['python']}; {packages}.",
        f"Payload {human_bytes(config['payload_bytes'])} per transfer, "
        f"{config['warmup']} warm-up + {config['repeats']} timed rounds"
        f"{' (--quick)' if config['quick'] else ''}; two processes on 127.0.0.1.",
        "",
        "## Headline",
        "",
        headline(doc),
        "",
    ]
    for suite in dict.fromkeys(r["suite"] for r in doc["records"]):
        rows = _select(doc["records"], suite=suite)
        workers = any("workers" in r for r in rows)
        out += [f"## {suite}", ""]
        out.append(
            "| transport | variant | chunk |"
            + (" workers |" if workers else "")
            + " GB/s median | min - max | x raw TCP |"
        )
        out.append("|---|---|---:|" + ("---:|" if workers else "") + "---:|---:|---:|")
        for r in rows:
            out.append(
                f"| {r['transport']} | {r['variant']} | {human_bytes(r['chunk_bytes'])} |"
                + (f" {r.get('workers', '')} |" if workers else "")
                + f" {r['gbps_median']:.2f} | {r['gbps_min']:.2f} - {r['gbps_max']:.2f} |"
                f" {r['ratio_to_tcp']:.2f} |"
            )
        out.append("")
    return "\n".join(out)


def plot_chunks(records: list[Record], path: Path) -> None:
    """Throughput vs chunk size, one panel per (suite, transport), ceilings drawn in."""
    plt = pyplot()
    keys = ((r["suite"], r["transport"]) for r in records if r["suite"] not in NOT_CHUNK_SWEEPS)
    panels = list(dict.fromkeys(keys))
    ceiling, memcpy = tcp_ceiling(records), memcpy_ceiling(records)
    references = tcp_references(records)
    ncols = 2
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(15, 5.6 * nrows), squeeze=False)
    chunk_sizes = sorted({r["chunk_bytes"] for r in records if r["suite"] not in NOT_CHUNK_SWEEPS})
    for ax, (suite, transport) in zip(axes.flat, panels, strict=False):
        rows = _select(records, suite=suite, transport=transport)
        for variant in dict.fromkeys(r["variant"] for r in rows):
            points = sorted(_select(rows, variant=variant), key=lambda r: r["chunk_bytes"])
            x = [r["chunk_bytes"] for r in points]
            ax.plot(x, [r["gbps_median"] for r in points], marker="o", label=variant)
            ax.fill_between(
                x, [r["gbps_min"] for r in points], [r["gbps_max"] for r in points], alpha=0.15
            )
        tcp = references.get(suite, ceiling)
        ax.axhline(tcp, color="black", linestyle="--", linewidth=1, label="raw TCP (same rounds)")
        top = max([tcp, *(r["gbps_max"] for r in rows)]) * 1.15
        if memcpy is not None and memcpy <= top * 1.5:
            ax.axhline(memcpy, color="grey", linestyle=":", linewidth=1, label="memcpy ceiling")
            top = max(top, memcpy * 1.05)
        elif memcpy is not None:
            ax.text(
                0.99,
                0.98,
                f"memcpy ceiling {memcpy:.1f} GB/s (off scale)",
                transform=ax.transAxes,
                ha="right",
                va="top",
                fontsize=8,
                color="grey",
            )
        ax.set_ylim(0, top)
        ax.set_xscale("log", base=2)
        ax.set_xticks(chunk_sizes, [human_bytes(c) for c in chunk_sizes], fontsize=8)
        ax.set_title(f"{suite}: {transport}", fontsize=10)
        ax.set_xlabel("chunk size")
        ax.set_ylabel("GB/s (median; band min..max)")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    payload = human_bytes(records[0]["payload_bytes"]) if records else ""
    fig.suptitle(f"Throughput vs chunk size, {payload} per transfer, two processes on loopback")
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ps(records: list[Record], path: Path) -> bool:
    """PS throughput vs number of workers, from ``suite="ps"`` records carrying
    ``workers``; one line per (transport, variant). False when there is nothing to draw."""
    rows = [r for r in records if r["suite"] == "ps" and "workers" in r]
    if not rows:
        return False
    plt = pyplot()
    rates = all("pushes_per_s" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if rates else 1, figsize=(15 if rates else 8, 5), squeeze=False)
    ax = axes[0][0]
    for transport, variant in dict.fromkeys((r["transport"], r["variant"]) for r in rows):
        points = _select(rows, transport=transport, variant=variant)
        points.sort(key=lambda r: r["workers"])
        medians = [r["gbps_median"] for r in points]
        ax.errorbar(
            [r["workers"] for r in points],
            medians,
            yerr=[
                [m - r["gbps_min"] for m, r in zip(medians, points, strict=True)],
                [r["gbps_max"] - m for m, r in zip(medians, points, strict=True)],
            ],
            marker="o",
            capsize=3,
            label=f"{transport}: {variant}",
        )
        if rates:
            axes[0][1].plot(
                [r["workers"] for r in points],
                [r["pushes_per_s"] for r in points],
                marker="o",
                label=f"{transport}: {variant}",
            )
    ax.axhline(tcp_ceiling(records), color="black", linestyle="--", label="raw TCP ceiling")
    ax.set_xlabel("workers")
    ax.set_ylabel("GB/s (median; bars min..max)")
    ax.set_ylim(bottom=0)
    ax.set_title("Parameter-server throughput vs workers")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if rates:
        ax = axes[0][1]
        ax.set_xlabel("workers")
        ax.set_ylabel("pushes applied per second (median)")
        ax.set_yscale("log")
        ax.set_title("Pushes per second vs workers")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_all(doc: dict[str, Any], out: Path) -> list[Path]:
    """JSON (strict: no NaN or Inf), markdown, and the charts; the paths written."""
    written = [out / JSON_NAME, out / MARKDOWN_NAME, out / CHUNKS_PNG]
    write_json(written[0], doc)
    written[1].write_text(markdown(doc))
    plot_chunks(doc["records"], written[2])
    if plot_ps(doc["records"], out / PS_PNG):
        written.append(out / PS_PNG)
    return written
