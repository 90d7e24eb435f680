#!/usr/bin/env python3
"""Summarise a per-test CPU profile (`pytest --cpu-profile FILE`, tests/cpuprofile.py).

    python scripts/suite_profile.py FILE [--top 30] [--cores 2] [--wait 5] [--costs tests/xdist_costs.json]
    python scripts/suite_profile.py JUNIT.xml --costs tests/xdist_costs.json   # pytest --junit-xml


Prints the totals (CPU seconds of pytest and every process it started, wall seconds, and the
shortest wall the CPU allows on --cores cores), the CPU per directory and per file, the --top tests
by CPU, and the tests that wait: wall - CPU over --wait seconds, i.e. time in which not even one core
was busy for the test (sleeps, deadlines, polling intervals, start-ups that wait on each other).
Only meaningful for a profile taken on an otherwise idle machine: under load every test's wall grows.
Reads the lines of several pytest-xdist workers too (each test once), and prints each worker's busy
time (the sum of its tests' walls: a balanced `-n 2` run has two close figures). `--costs OUT` writes
each test file's seconds (per test the larger of CPU and wall) as the JSON that tests/xdist_plan.py
orders `pytest -n 2`'s units by; take it from an idle run. A junit XML file (`pytest --junit-xml`,
e.g. CI's idle two-worker run) has each test's wall only (set-up, call and tear-down): its CPU is
unknown (printed as 0) and its costs are the walls."""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path


def load(path: Path) -> tuple[list[dict], list[dict]]:
    """(test records, the `<collection>` / `<session>` records); the last record of a test id wins."""
    tests: dict[str, dict] = {}
    other = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        (other.append(rec) if rec["id"].startswith("<") else tests.__setitem__(rec["id"], rec))
    return list(tests.values()), other


def load_junit(path: Path) -> list[dict]:
    """The test records of a junit XML file: wall = the testcase's time, CPU unknown (0). A classname
    is the test file's dotted path, with a test class's name after it when the test is a method."""
    tests = []
    for case in ET.parse(path).iter("testcase"):
        parts = case.get("classname", "").split(".")
        n = next((i for i in range(len(parts), 0, -1) if Path(*parts[:i]).with_suffix(".py").is_file()), len(parts))
        test_id = "::".join(["/".join(parts[:n]) + ".py", *parts[n:], case.get("name", "")])
        tests.append({"id": test_id, "cpu": 0.0, "wall": float(case.get("time", 0.0))})
    return tests


def _table(title: str, rows: list[tuple[str, float, float, int]], top: int) -> None:
    print(f"\n{title}\n{'CPU-s':>9} {'wall-s':>9} {'tests':>6}  name")
    for name, cpu, wall, n in rows[:top]:
        print(f"{cpu:9.1f} {wall:9.1f} {n:6d}  {name}")


def _grouped(tests: list[dict], key) -> list[tuple[str, float, float, int]]:
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for t in tests:
        s = sums[key(t["id"])]
        s[0] += t["cpu"]
        s[1] += t["wall"]
        s[2] += 1
    return sorted(((k, c, w, int(n)) for k, (c, w, n) in sums.items()), key=lambda r: (-r[1], -r[2]))


def _phase_text(t: dict) -> str:
    phases = t.get("phases") or {}
    return " ".join(f"{k} {v[0]:.1f}/{v[1]:.1f}" for k, v in phases.items() if v[1] >= 0.5)


def report(tests: list[dict], other: list[dict], top: int, cores: int, wait: float) -> None:
    cpu = sum(t["cpu"] for t in tests)
    wall = sum(t["wall"] for t in tests)
    print(
        f"{len(tests)} tests: {cpu:.0f} CPU-s, {wall:.0f} wall-s in the tests' phases (CPU/wall {cpu / max(wall, 1e-9):.2f})"
    )
    print(f"the CPU alone needs >= {cpu / cores:.0f} s of wall on {cores} cores busy all the time")
    for rec in other:
        print(f"{rec['id']} ({rec.get('worker', '?')}): {rec['cpu']:.1f} CPU-s, {rec['wall']:.1f} wall-s")
    _table("by directory", _grouped(tests, lambda i: i.split("::")[0].rsplit("/", 1)[0]), top)
    _table(f"by file (top {top})", _grouped(tests, lambda i: i.split("::")[0]), top)
    _table(f"tests by {'CPU' if cpu else 'wall'} (top {top})", _grouped(tests, lambda i: i), top)
    if not cpu:  # a junit file: no CPU to compare the walls with
        return
    waiting = sorted((t for t in tests if t["wall"] - t["cpu"] > wait), key=lambda t: t["cpu"] - t["wall"])
    print(f"\ntests with wall - CPU > {wait} s (waiting; phases as CPU/wall)")
    print(f"{'wait-s':>8} {'CPU-s':>8} {'wall-s':>8}  test")
    for t in waiting[:top]:
        print(f"{t['wall'] - t['cpu']:8.1f} {t['cpu']:8.1f} {t['wall']:8.1f}  {t['id']}  [{_phase_text(t)}]")
    print(f"{len(waiting)} tests, {sum(t['wall'] - t['cpu'] for t in waiting):.0f} s of waiting in all")
    _threads(tests, top)


def _threads(tests: list[dict], top: int) -> None:
    """Where the threads of the processes a test left running (reused worlds) grew most: idle threads
    can cost CPU (a gloo group's I/O loop wakes up every 10 ms)."""
    steps, before = [], defaultdict(int)
    for t in tests:  # file order is run order (per pytest-xdist worker)
        if "threads" in t:
            steps.append((t["threads"] - before[t.get("worker")], t["threads"], t["id"]))
            before[t.get("worker")] = t["threads"]
    if steps:
        print(f"\nthreads left running after a test: most {max(s[1] for s in steps)}; largest increases")
        for grew, now, test in sorted(steps, reverse=True)[: min(top, 10)]:
            if grew > 0:
                print(f"{grew:+6d} -> {now:5d}  {test}")


def _workers(tests: list[dict]) -> None:
    busy: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for t in tests:
        b = busy[t.get("worker", "main")]
        b[0] += t["cpu"]
        b[1] += t["wall"]
        b[2] += 1
    if len(busy) > 1:
        print(
            "\nper worker: "
            + "; ".join(f"{w} {n} tests, {c:.0f} CPU-s, {s:.0f} wall-s" for w, (c, s, n) in sorted(busy.items()))
        )


def write_costs(tests: list[dict], out: Path) -> None:
    """Each test file's seconds: the sum over its tests of max(CPU, wall), as sorted JSON."""
    per_file: dict[str, float] = defaultdict(float)
    for t in tests:
        per_file[t["id"].split("::")[0]] += max(t["cpu"], t["wall"])
    out.write_text(json.dumps({k: round(v, 1) for k, v in sorted(per_file.items())}, indent=0) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path, help="the JSON lines of `pytest --cpu-profile FILE`, or a junit .xml")
    parser.add_argument("--top", type=int, default=30, help="rows per table (default 30)")
    parser.add_argument("--cores", type=int, default=2, help="cores of the machine the suite runs on (default 2)")
    parser.add_argument("--wait", type=float, default=5.0, help="list tests whose wall exceeds their CPU by this (s)")
    parser.add_argument("--costs", type=Path, help="write each test file's seconds here (tests/xdist_plan.py's table)")
    args = parser.parse_args()
    tests, other = (load_junit(args.file), []) if args.file.suffix == ".xml" else load(args.file)
    report(tests, other, args.top, args.cores, args.wait)
    _workers(tests)
    if args.costs:
        write_costs(tests, args.costs)


if __name__ == "__main__":
    main()
