"""Crash harness: SIGKILL writers (build --force, add, remove) at random points; the index must hold the old or the new contents.

Each round starts a writer process that loops over one kind of change, waits a random time
(seeded), kills it with SIGKILL, then opens the index in this process and checks it:

- it opens (no error, no repair step needed);
- its item ids are exactly those of a state some complete change produced (the generation in
  the manifest says which one for add/remove; for build, one of the two catalogs built in turn);
- every item's stored vector is its own: searching with the item's reference vector finds that
  item first with score 1 (a vector from another generation or another item would not).

    .venv/bin/python benchmarks/crash.py [--kills 200] [--seed 20261126] [--json]

``run(kills, seed)`` is what ``benchmarks/reliability.py`` and the tests call.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "src" / "lookalike" / "data" / "sample"
QUERY = SAMPLE / "queries" / "watches-45260.jpg"

# add/remove: change j (0, 1, 2, ...) adds item c{j//2} when j is even and removes it when odd,
# so the generation in the manifest says exactly which items the index must hold.
CHANGER = textwrap.dedent(
    """
    import csv, sys
    from lookalike import VisualSearch
    index, query, work = sys.argv[1], sys.argv[2], sys.argv[3]
    vs = VisualSearch.open(index)
    vs.featurizer  # load the model before the first change
    print("ready", flush=True)
    while True:
        j = vs.info()["generation"] - 1
        name = f"c{j // 2}"
        if j % 2 == 0:
            path = f"{work}/{name}.csv"
            with open(path, "w", newline="") as f:
                csv.writer(f).writerows([["id", "image", "label"], [name, query, "crash"]])
            vs.add(path)
        else:
            vs.remove([name])
    """
)

# build: rebuild the index in place (force) from catalog A, then B, then A ...
BUILDER = textwrap.dedent(
    """
    import sys
    from lookalike import VisualSearch
    index, a, b = sys.argv[1], sys.argv[2], sys.argv[3]
    VisualSearch.open(index).featurizer  # warm the ONNX export cache
    print("ready", flush=True)
    n = 0
    while True:
        VisualSearch.build([a, b][n % 2], index, force=True)
        n += 1
    """
)


def _write_catalog(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "image", "label", "title"])
        w.writeheader()
        for r in rows:
            w.writerow({"id": r["id"], "image": str(SAMPLE / r["image"]), "label": r["label"], "title": r["title"]})
    return path


def _check(index: Path, allowed: list[set[str]], reference: dict[str, np.ndarray]) -> tuple[bool, str, object]:
    """Open the index and check it holds exactly one allowed id set with each item's own vector."""
    from lookalike import VisualSearch

    try:
        vs = VisualSearch.open(index)
    except Exception as exc:  # noqa: BLE001 - any failure to open is what the harness looks for
        return False, f"does not open: {type(exc).__name__}: {exc}", -1
    try:
        gen = vs.info()["generation"]
        hits = vs.search(np.ones(vs.dim, np.float32), k=100_000).hits
        ids = {h.id for h in hits}
        if len(ids) != len(vs) or ids not in allowed:
            return False, f"generation {gen}: holds {len(ids)} items, not one of the allowed states", gen
        names = sorted(ids)
        results = vs.search(np.stack([reference[i] for i in names]), k=1)
        wrong = [i for i, r in zip(names, results) if r.hits[0].id != i or r.hits[0].score < 0.9999]
        if wrong:
            return False, f"generation {gen}: {len(wrong)} items do not hold their own vector (e.g. {wrong[0]})", gen
        return True, "", (gen, len(ids))
    finally:
        vs.close()


def run(kills: int = 200, seed: int = 20261126, *, max_delay: float = 1.5, log=None) -> dict:
    """Kill writers ``kills`` times (half add/remove, half build --force); return the tally."""
    from lookalike import VisualSearch

    rng = random.Random(seed)
    rows = list(csv.DictReader(open(SAMPLE / "catalog.csv")))
    work = Path(tempfile.mkdtemp(prefix="lookalike-crash-"))
    try:
        cat_a = _write_catalog(work / "a.csv", rows[:40])
        cat_b = _write_catalog(work / "b.csv", rows[40:70])
        changing, building = work / "changing", work / "building"
        base = VisualSearch.build(_write_catalog(work / "base.csv", rows[:60]), changing)
        reference = dict(zip((r["id"] for r in rows), base.featurize([str(SAMPLE / r["image"]) for r in rows])))
        query_vector = base.featurize(str(QUERY))[0]
        base.close()
        VisualSearch.build(cat_a, building).close()
        base_ids = {r["id"] for r in rows[:60]}
        build_states = [{r["id"] for r in rows[:40]}, {r["id"] for r in rows[40:70]}]
        (work / "adds").mkdir()
        (work / "changer.py").write_text(CHANGER)
        (work / "builder.py").write_text(BUILDER)

        tally = {"kills": 0, "survived": 0, "failures": [], "by_operation": {}}
        for n in range(kills):
            op = "add/remove" if n % 2 == 0 else "build"
            if op == "add/remove":
                cmd = [sys.executable, str(work / "changer.py"), str(changing), str(QUERY), str(work / "adds")]
                index = changing
            else:
                cmd = [sys.executable, str(work / "builder.py"), str(building), str(cat_a), str(cat_b)]
                index = building
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            line = proc.stdout.readline().strip()
            if line != "ready":
                proc.kill()
                raise RuntimeError(f"writer did not start: {proc.stderr.read()[-2000:]}")
            time.sleep(rng.uniform(0.02, max_delay))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()

            if op == "add/remove":
                gen = json.loads((changing / "lookalike.json").read_text())["generation"]
                done = gen - 1
                extra = {f"c{(done - 1) // 2}"} if done % 2 else set()
                allowed = [base_ids | extra]
                for name in extra:
                    reference[name] = query_vector
            else:
                allowed = build_states
            ok, why, gen = _check(index, allowed, reference)
            stats = tally["by_operation"].setdefault(op, {"kills": 0, "survived": 0, "generations": set()})
            stats["kills"] += 1
            stats["generations"].add(gen)
            tally["kills"] += 1
            if ok:
                stats["survived"] += 1
                tally["survived"] += 1
            else:
                tally["failures"].append(f"kill {n + 1} ({op}): {why}")
            if log:
                log(f"kill {n + 1:4d}/{kills} {op:<10} {'ok' if ok else 'FAILED: ' + why}")
        for stats in tally["by_operation"].values():
            stats["distinct_states_seen"] = len(stats.pop("generations"))
        # The next change after the crashes cleans up what the killed writers left.
        VisualSearch.build(cat_a, building, force=True).close()
        with VisualSearch.open(changing) as vs:
            vs.remove(list({h.id for h in vs.search(query_vector, k=len(vs)).hits} - base_ids) or list(base_ids)[:1])
        leftovers = [p.name for d in (changing, building) for p in d.iterdir() if p.name.endswith(".tmp")]
        siblings = [p.name for p in work.iterdir() if p.name.startswith(".")]
        tally["leftover_files"] = leftovers + siblings
        tally["final_generation_add_remove"] = json.loads((changing / "lookalike.json").read_text())["generation"]
        return tally
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--seed", type=int, default=20261126)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    tally = run(args.kills, args.seed, log=None if args.json else print)
    tally["seconds"] = round(time.perf_counter() - start, 1)
    if args.json:
        print(json.dumps(tally, indent=2))
    else:
        print(f"\nkills survived: {tally['survived']} / {tally['kills']} in {tally['seconds']} s")
        for op, stats in tally["by_operation"].items():
            print(f"  {op:<10} {stats['survived']} / {stats['kills']} (distinct states seen after kills: {stats['distinct_states_seen']})")
        print(f"  add/remove writers reached generation {tally['final_generation_add_remove']}; leftover files: {tally['leftover_files'] or 'none'}")
        for f in tally["failures"][:10]:
            print("  " + f)
        print("PASS" if tally["survived"] == tally["kills"] and not tally["leftover_files"] else "FAIL")
    return 0 if tally["survived"] == tally["kills"] and not tally["leftover_files"] else 1


if __name__ == "__main__":
    sys.exit(main())
