"""The table of `make bench` (e2e/bench_compare.py): rows of ours vs reference
with a ratio and a target, built from the load generator's JSON results.

Pure functions of the results, so the report can be rebuilt from a saved
.bench/results-*.json: python -m e2e.bench_report .bench/results-....json
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class Target:
    """How a row passes: ours/reference >= or <= `value`, ours - reference <= `value`
    (a difference in the row's unit), or ours <= / == `value` on its own."""

    kind: str  # "ratio>=", "ratio<=", "diff<=", "<=", "=="
    value: float

    def text(self) -> str:
        return {
            "ratio>=": f">= {self.value:g}x",
            "ratio<=": f"<= {self.value:g}x",
            "diff<=": f"ours-ref <= {self.value:g}",
            "<=": f"<= {self.value:g}",
            "==": f"= {self.value:g}",
        }[self.kind]

    def passes(self, ours: float, reference: float | None) -> bool:
        if self.kind in ("ratio>=", "ratio<=", "diff<="):
            if reference is None:
                return False
            if self.kind == "diff<=":
                return ours - reference <= self.value
            ratio = ours / reference if reference else float("inf")
            return ratio >= self.value if self.kind == "ratio>=" else ratio <= self.value
        return ours <= self.value if self.kind == "<=" else ours == self.value


@dataclass
class Row:
    scenario: str
    metric: str
    unit: str
    ours: float | None
    reference: float | None = None
    target: Target | None = None

    @property
    def ratio(self) -> float | None:
        if self.ours is None or not self.reference:
            return None
        return self.ours / self.reference

    @property
    def verdict(self) -> str:
        if self.target is None:
            return ""
        if self.ours is None:
            return "MISS"
        return "PASS" if self.target.passes(self.ours, self.reference) else "MISS"

    def as_dict(self) -> dict:
        data = asdict(self)
        data["target"] = self.target.text() if self.target else None
        data["ratio"] = self.ratio
        data["verdict"] = self.verdict
        return data


AT_LEAST_REF = Target("ratio>=", 1.0)
AT_MOST_REF = Target("ratio<=", 1.0)
NONE_LOST = Target("==", 0)


def _get(data: Any, *path: str) -> Any:
    """data[path[0]][path[1]]..., or None where a key is missing (a scenario that did not run)."""
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _lost(result: dict | None) -> float | None:
    """Missing + duplicated + out-of-order + unexpected, from a read-back or a fan-out."""
    if result is None:
        return None
    if "readBack" in result:
        check = result["readBack"]
        kinds = ("missing", "duplicate", "outOfOrder", "unexpected", "foreign", "readIncomplete")
        return sum(check.get(kind, 0) for kind in kinds)
    if "wrongReads" in result:
        return result["wrongReads"]
    if "wrong" in result:
        return result["wrong"]
    return result["missing"] + result["duplicate"] + result["outOfOrder"]


def _failed_requests(statuses: dict[str, int] | None) -> float | None:
    if statuses is None:
        return None
    return sum(n for status, n in statuses.items() if not status.startswith("2"))


def cpu_us_per(result: dict | None, group: str, units: float | None) -> float | None:
    """CPU microseconds of a process group (from /proc) per unit of work."""
    cpu_s = _get(result, "cpu", "groups", group, "cpuS")
    if cpu_s is None or not units:
        return None
    return cpu_s * 1e6 / units


def redis_usec_per(result: dict | None, units: float | None) -> float | None:
    """Redis's own per-command time (INFO commandstats usec) per unit of work."""
    commands = _get(result, "cpu", "redisCommands")
    if not commands or not units:
        return None
    return sum(c["usec"] for c in commands.values()) / units


def loadgen_share(result: dict | None) -> float | None:
    """The generator's CPU over the measured window, as a fraction of one core."""
    cpu_s, seconds = _get(result, "cpu", "loadgenCpuS"), _get(result, "cpu", "seconds")
    return cpu_s / seconds if cpu_s is not None and seconds else None


def append_rows(label: str, pair: dict) -> list[Row]:
    ours, ref = pair.get("ours"), pair.get("reference")
    return [
        Row(label, "appends/s", "1/s", _get(ours, "perSecond"), _get(ref, "perSecond"), AT_LEAST_REF),
        Row(label, "latency p50", "ms", _get(ours, "latencyMs", "p50"), _get(ref, "latencyMs", "p50")),
        Row(label, "latency p99", "ms", _get(ours, "latencyMs", "p99"), _get(ref, "latencyMs", "p99"), AT_MOST_REF),
        Row(label, "failed requests", "", _failed_requests(_get(ours, "statuses")), _failed_requests(_get(ref, "statuses")), NONE_LOST),
        Row(label, "read back: lost+dup+out-of-order", "", _lost(ours), _lost(ref), NONE_LOST),
    ]  # fmt: skip


def catchup_rows(label: str, pair: dict) -> list[Row]:
    ours, ref = pair.get("ours"), pair.get("reference")
    return [
        Row(label, "MB/s (median)", "MB/s", _get(ours, "medianMbPerS"), _get(ref, "medianMbPerS"), Target("ratio>=", 0.5)),
        Row(label, "MB/s (best)", "MB/s", _get(ours, "bestMbPerS"), _get(ref, "bestMbPerS")),
        Row(label, "time (median)", "ms", _get(ours, "medianMs"), _get(ref, "medianMs")),
        Row(label, "requests per read", "", _get(ours, "requestsPerRead"), _get(ref, "requestsPerRead")),
        Row(label, "wrong reads", "", _lost(ours), _lost(ref), NONE_LOST),
    ]  # fmt: skip


def fanout_rows(label: str, pair: dict) -> list[Row]:
    ours, ref = pair.get("ours"), pair.get("reference")
    return [
        Row(label, "delivery p50", "ms", _get(ours, "deliveryMs", "p50"), _get(ref, "deliveryMs", "p50")),
        Row(label, "delivery p99", "ms", _get(ours, "deliveryMs", "p99"), _get(ref, "deliveryMs", "p99"), AT_MOST_REF),
        Row(label, "all subscribers served p99", "ms", _get(ours, "allServedMs", "p99"), _get(ref, "allServedMs", "p99")),
        Row(label, "connect p50", "ms", _get(ours, "connectMs", "p50"), _get(ref, "connectMs", "p50")),
        Row(label, "connect p99", "ms", _get(ours, "connectMs", "p99"), _get(ref, "connectMs", "p99")),
        Row(label, "append rate sent", "1/s", _get(ours, "achievedRate"), _get(ref, "achievedRate")),
        Row(label, "missing", "", _get(ours, "missing"), _get(ref, "missing"), NONE_LOST),
        Row(label, "duplicate", "", _get(ours, "duplicate"), _get(ref, "duplicate"), NONE_LOST),
        Row(label, "out of order", "", _get(ours, "outOfOrder"), _get(ref, "outOfOrder"), NONE_LOST),
        Row(label, "connect failures", "", _get(ours, "connectFailures"), _get(ref, "connectFailures"), NONE_LOST),
    ]  # fmt: skip


def longpoll_rows(label: str, pair: dict) -> list[Row]:
    ours, ref = pair.get("ours"), pair.get("reference")
    return [
        Row(label, "wake p50", "ms", _get(ours, "wakeMs", "p50"), _get(ref, "wakeMs", "p50"), Target("diff<=", 1.0)),
        Row(label, "wake p99", "ms", _get(ours, "wakeMs", "p99"), _get(ref, "wakeMs", "p99")),
        Row(label, "wrong wake-ups", "", _lost(ours), _lost(ref), NONE_LOST),
    ]  # fmt: skip


def scale_rows(label: str, result: dict, served_target_ms: float | None) -> list[Row]:
    target = Target("<=", served_target_ms) if served_target_ms is not None else None
    return [
        Row(label, "all subscribers served p50", "ms", _get(result, "allServedMs", "p50")),
        Row(label, "all subscribers served p99", "ms", _get(result, "allServedMs", "p99"), target=target),
        Row(label, "all subscribers served max", "ms", _get(result, "allServedMs", "max")),
        Row(label, "connect p99", "ms", _get(result, "connectMs", "p99")),
        Row(label, "lost+dup+out-of-order", "", _lost(result), target=NONE_LOST),
        Row(label, "connect failures", "", _get(result, "connectFailures"), target=NONE_LOST),
    ]  # fmt: skip


def cpu_rows(results: dict) -> list[Row]:
    """(g): CPU per append and per delivered SSE event, gateway and Redis apart."""
    rows = []
    for key, label in (("append", "append"), ("idempotent", "idempotent append")):
        pair = results.get(key)
        if not pair:
            continue
        ours, ref = pair.get("ours"), pair.get("reference")
        # The CPU window covers only the measured seconds: divide by the appends acknowledged in it.
        n_ours, n_ref = _get(ours, "acked"), _get(ref, "acked")
        rows += [
            Row("g cpu", f"{label}: server CPU", "us", cpu_us_per(ours, "server", n_ours), cpu_us_per(ref, "server", n_ref)),
            Row("g cpu", f"{label}: Redis CPU", "us", cpu_us_per(ours, "redis", n_ours)),
            Row("g cpu", f"{label}: Redis commandstats", "us", redis_usec_per(ours, n_ours)),
        ]  # fmt: skip
    fanouts = [
        ("d fan-out", results.get("fanout", {}).get("ours"), results.get("fanout", {}).get("reference"))
    ]
    fanouts += [(f"f {name}", result, None) for name, result in results.get("scale", {}).items()]
    for label, ours, ref in fanouts:
        if not ours:
            continue
        rows += [
            Row("g cpu", f"{label}: server CPU per SSE event", "us", cpu_us_per(ours, "server", _get(ours, "delivered")), cpu_us_per(ref, "server", _get(ref, "delivered"))),
            Row("g cpu", f"{label}: Redis CPU per SSE event", "us", cpu_us_per(ours, "redis", _get(ours, "delivered"))),
        ]  # fmt: skip
    return rows


def wrk_rows(check: dict | None) -> list[Row]:
    """The generator cross-check: wrk's rate within 10% of ours, same server, same shape."""
    if not check:
        return []
    wrk_rate, ours = check.get("perSecond"), check.get("loadgenPerSecond")
    diff = abs(ours - wrk_rate) / wrk_rate * 100 if wrk_rate and ours is not None else None
    return [
        Row("wrk check", "wrk failed requests", "", check.get("non2xx", 0) + check.get("socketErrors", 0), target=NONE_LOST),
        Row("wrk check", "wrk appends/s (ds-gateway, mean of 2)", "1/s", wrk_rate),
        Row("wrk check", "loadgen appends/s (ds-gateway, mean of 2)", "1/s", ours),
        Row("wrk check", "difference", "%", diff, target=Target("<=", 10)),
    ]  # fmt: skip


def all_rows(results: dict) -> list[Row]:
    rows: list[Row] = []
    if "append" in results:
        rows += append_rows("a append", results["append"])
    if "idempotent" in results:
        rows += append_rows("b idempotent", results["idempotent"])
    for key, pair in results.get("catchup", {}).items():
        rows += catchup_rows(f"c catch-up {key}", pair)
    if "fanout" in results:
        rows += fanout_rows("d fan-out", results["fanout"])
    if "longpoll" in results:
        rows += longpoll_rows("e long-poll", results["longpoll"])
    for name, result in results.get("scale", {}).items():
        rows += scale_rows(f"f {name}", result, result.get("servedTargetMs"))
    rows += cpu_rows(results)
    rows += wrk_rows(results.get("wrk"))
    return rows


def loadgen_rows(results: dict) -> list[tuple[str, str, float | None]]:
    """(scenario, side, share of one core) for every load generator run."""
    out = []
    for key, value in results.items():
        if key == "wrk":
            out += [
                ("wrk check", f"wrk run {i + 1}", loadgen_share(r))
                for i, r in enumerate(value.get("wrkRuns", []))
            ]
            out += [
                ("wrk check", f"loadgen run {i + 1}", loadgen_share(r))
                for i, r in enumerate(value.get("loadgenRuns", []))
            ]
            continue
        if not isinstance(value, dict):
            continue
        pairs = value.items() if key in ("catchup", "scale") else [(key, value)]
        for name, pair in pairs:
            sides = [("ours", pair)] if key == "scale" else list(pair.items())
            for side, result in sides:
                if isinstance(result, dict):
                    out.append((name if key != "catchup" else f"catchup {name}", side, loadgen_share(result)))
    return out


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100 or float(value).is_integer():
        return f"{value:,.0f}"
    return f"{value:.2f}"


def render(rows: list[Row]) -> str:
    header = ("scenario", "metric", "ours", "reference", "ratio", "target", "")
    table = [header] + [
        (
            r.scenario,
            f"{r.metric} ({r.unit})" if r.unit else r.metric,
            _fmt(r.ours),
            _fmt(r.reference),
            f"{r.ratio:.2f}x" if r.ratio is not None else "",
            r.target.text() if r.target else "",
            r.verdict,
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = []
    for i, line in enumerate(table):
        lines.append(
            "  ".join(
                cell.rjust(w) if 2 <= j <= 4 else cell.ljust(w)
                for j, (cell, w) in enumerate(zip(line, widths, strict=True))
            ).rstrip()
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)  # fmt: skip


def render_loadgen(results: dict) -> str:
    parts = [
        f"{name} ({side}) {share * 100:.0f}%"
        for name, side, share in loadgen_rows(results)
        if share is not None
    ]
    return "load generator CPU, share of one core over each measured window: " + ", ".join(parts)


def main() -> int:
    saved = json.loads(Path(sys.argv[1]).read_text())
    print(render(all_rows(saved["results"])))
    print(render_loadgen(saved["results"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
