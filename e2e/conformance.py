"""Run the official Durable Streams conformance suite (npm
@durable-streams/server-conformance-tests, pinned in e2e/package.json).

    python -m e2e.conformance                 # starts Redis and a gateway, runs the suite
    python -m e2e.conformance --url URL       # against a running server (with
                                              # DSGW_WEBHOOK_ALLOW_PRIVATE=loopback: the
                                              # subscription tests' receiver is on loopback)

Prints the counts and exits non-zero unless every test passed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

E2E_DIR = Path(__file__).resolve().parent
ROOT = E2E_DIR.parent
EXPECTED_TESTS = 338  # the pinned 0.3.6 suite with its 6 optional subscription tests
# The suite's webhook receiver listens on the runner's 127.0.0.1, and it
# expects http://10.0.0.1/... refused: loopback only, not every private address.
GATEWAY_ENV = {"DSGW_WEBHOOK_ALLOW_PRIVATE": "loopback"}


@dataclass
class SuiteResult:
    passed: int
    failed: int
    skipped: int
    failures: list[str]
    returncode: int

    def summary(self) -> str:
        return f"conformance: {self.passed} passed, {self.failed} failed, {self.skipped} skipped"


def ensure_node_modules() -> None:
    """Install the pinned suite from e2e/package-lock.json when missing."""
    if not (E2E_DIR / "node_modules" / "@durable-streams" / "server-conformance-tests").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=E2E_DIR, check=True)


def run_suite(base_url: str, *, quiet: bool = False) -> SuiteResult:
    ensure_node_modules()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        proc = subprocess.run(
            [
                "npx",
                "--no-install",
                "vitest",
                "run",
                "--reporter=dot",
                "--reporter=json",
                f"--outputFile.json={report}",
            ],
            cwd=E2E_DIR,
            env={**os.environ, "CONFORMANCE_TEST_URL": base_url, "FORCE_COLOR": "0"},
            stdout=subprocess.PIPE if quiet else None,
            stderr=subprocess.STDOUT if quiet else None,
            timeout=900,
        )
        if not report.exists():
            raise RuntimeError(f"the suite wrote no report (exit {proc.returncode})")
        data = json.loads(report.read_text())
    failures = [
        t["fullName"]
        for f in data.get("testResults", [])
        for t in f.get("assertionResults", [])
        if t.get("status") == "failed"
    ]
    return SuiteResult(
        passed=data["numPassedTests"],
        failed=data["numFailedTests"],
        skipped=data.get("numPendingTests", 0) + data.get("numTodoTests", 0),
        failures=failures,
        returncode=proc.returncode,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="base URL of a running server (default: start one)")
    args = parser.parse_args()
    if args.url:
        result = run_suite(args.url)
    else:
        sys.path.insert(0, str(ROOT))
        from gateway.embedded import start_redis
        from tests.conftest import start_gateway

        with tempfile.TemporaryDirectory() as tmp:
            redis = start_redis(Path(tmp) / "redis", persistent=False)
            gateway = start_gateway(redis.url, Path(tmp), **GATEWAY_ENV)
            try:
                result = run_suite(gateway.url)
            finally:
                gateway.stop()
                redis.stop()
    for name in result.failures:
        print(f"FAILED: {name}")
    print(result.summary())
    ok = result.failed == 0 and result.passed == EXPECTED_TESTS
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
