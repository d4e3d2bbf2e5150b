"""Reliability table: crash kills, fuzz cases, schemathesis requests, concurrent read-write, upload memory.

Runs the three harnesses in this one process and prints one table with the targets:

    kills survived / tried        benchmarks/crash.py               >= 200 kills, 0 failures
    fuzz cases / crashes          benchmarks/fuzz.py                >= 100,000 cases, 0 crashes
    schemathesis requests / 5xx   benchmarks/service_reliability.py >= 2,000 requests, 0 5xx
    read-write minutes / errors   benchmarks/service_reliability.py 0 errors
    peak memory, upload load      benchmarks/service_reliability.py every request answered

    .venv/bin/python benchmarks/reliability.py [--quick] [--json]

``--quick`` runs each harness briefly: the zero-failure targets are judged, the counts are not.
About 15 minutes in full.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import crash  # noqa: E402
import fuzz  # noqa: E402
import service_reliability  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs of each harness (below the targets)")
    parser.add_argument("--seed", type=int, default=20261126)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    q = args.quick
    start = time.perf_counter()
    timings = {}

    t = time.perf_counter()
    kills = crash.run(kills=20 if q else 200, seed=args.seed)
    timings["crash"] = time.perf_counter() - t
    t = time.perf_counter()
    fuzzed = fuzz.run(cases_per_target=None, seconds=30 if q else 240, seed=args.seed)
    timings["fuzz"] = time.perf_counter() - t
    t = time.perf_counter()
    service = service_reliability.run(schemathesis_requests=300 if q else 2000, rw_seconds=20 if q else 120, upload_clients=16)
    timings["service"] = time.perf_counter() - t

    rows = [
        ("kills survived / tried", f"{kills['survived']} / {kills['kills']}", (q or kills["kills"] >= 200) and kills["survived"] == kills["kills"]),
        ("fuzz cases / crashes (hangs, memory blow-ups)",
         f"{fuzzed['cases']:,} / {fuzzed['crashes']} ({fuzzed['hangs']}, {fuzzed.get('memory_blowups', 0)})",
         (q or fuzzed["cases"] >= 100_000) and fuzzed["crashes"] == 0 and fuzzed["hangs"] == 0
         and fuzzed.get("memory_blowups", 0) == 0),
        ("schemathesis requests / 5xx (schema failures)",
         f"{service['schemathesis_requests']:,} / {service['schemathesis_5xx']} ({service['schema_failures']})",
         (q or service["schemathesis_requests"] >= 2000) and service["schemathesis_5xx"] == 0 and service["schema_failures"] == 0),
        ("concurrent read-write minutes / errors", f"{service['rw_minutes']:.1f} / {service['rw_errors']}", service["rw_errors"] == 0),
        ("peak RSS under 16 max-size uploads", f"{service['upload_peak_rss_mb']:.0f} MB, answers {service['upload_answers']}, errors {service['upload_errors']}",
         service["upload_errors"] == 0),
    ]
    result = {"crash": kills, "fuzz": fuzzed, "service": service, "seconds": {k: round(v, 1) for k, v in timings.items()},
              "pass": all(ok for _, _, ok in rows)}
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(f"\nreliability ({'quick run: counts below the targets, not judged' if q else 'full run'}; {time.perf_counter() - start:.0f} s)")
        for name, value, ok in rows:
            print(f"  {name:<46} {value:<44} {'PASS' if ok else 'FAIL'}")
        for failure in kills["failures"][:5]:
            print("  kill failure: " + failure)
        print("PASS" if result["pass"] else "FAIL")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
