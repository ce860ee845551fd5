"""Timing helpers for the xipfs benchmarks: interleaved repetitions, medians, a comparison table.

Two shared, noisy cores make one timing worthless, so every measurement here is a list of
samples taken round-robin with the measurements it is compared with: ours, the baseline, ours,
the baseline, ... (the order rotates each round). A burst of noise then hits both sides, and
the ratio of the medians is stable even when the absolute figures are not.

A :class:`Case` is one thing to time: ``fn(state)`` run ``number`` times per sample, with an
optional untimed ``setup()`` before each sample (it builds ``state``, e.g. a fresh Filesystem
for a cold measurement) and ``teardown(state)`` after it. The garbage collector is off while
a sample runs.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

GIB = 1 << 30
MIB = 1 << 20

# Display units. A rate unit ("GiB/s") shows work per second; a time unit shows time per unit of
# work ("us/file": work counts files; "ms/call": work counts calls).
_RATE_UNITS = {"GiB/s": GIB, "MiB/s": MIB}
_TIME_UNITS = {"ns/file": 1, "us/file": 1_000, "us/call": 1_000, "ms/call": 1_000_000}


@dataclass
class Case:
    """One thing to time. ``work`` is the work done by one call of ``fn`` (bytes or operations)."""

    name: str
    fn: Callable[[Any], object]
    work: float
    unit: str
    setup: Callable[[], Any] | None = None
    teardown: Callable[[Any], None] | None = None
    number: int = 1

    def __post_init__(self) -> None:
        if self.unit not in _RATE_UNITS and self.unit not in _TIME_UNITS:
            raise ValueError(f"unknown unit {self.unit!r}")


@dataclass
class Measurement:
    """The samples of one :class:`Case`: nanoseconds per sample, ``work`` per sample."""

    name: str
    samples_ns: list[int]
    work: float
    unit: str

    @property
    def median_ns(self) -> float:
        return statistics.median(self.samples_ns)

    @property
    def best_ns(self) -> int:
        return min(self.samples_ns)

    @property
    def worst_ns(self) -> int:
        return max(self.samples_ns)

    def ns_per_unit(self, ns: float) -> float:
        return ns / self.work

    def show(self, ns: float) -> str:
        """``ns`` (the time of one sample) in this measurement's display unit."""
        if self.unit in _RATE_UNITS:
            value = self.work / _RATE_UNITS[self.unit] / (ns / 1e9)
        else:
            value = ns / self.work / _TIME_UNITS[self.unit]
        return f"{_num(value)} {self.unit}"

    @property
    def median(self) -> str:
        return self.show(self.median_ns)

    @property
    def best(self) -> str:
        return self.show(self.best_ns)

    def summary(self) -> str:
        return (f"{self.name}: median {self.median}, best {self.best}, worst {self.show(self.worst_ns)}"
                f" (n={len(self.samples_ns)})")


def _num(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def time_sample(case: Case) -> int:
    """One sample of ``case`` in nanoseconds: setup (untimed), ``number`` calls (timed, no gc), teardown."""
    state = case.setup() if case.setup is not None else None
    fn = case.fn
    number = case.number
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter_ns()
        for _ in range(number):
            fn(state)
        t1 = time.perf_counter_ns()
    finally:
        if enabled:
            gc.enable()
        if case.teardown is not None:
            case.teardown(state)
    return (t1 - t0) // number


def measure(cases: Sequence[Case], repeat: int, warmup: int = 1) -> dict[str, Measurement]:
    """Time ``cases`` round-robin: ``warmup`` untimed rounds, then ``repeat`` timed rounds.

    Each round runs every case once, starting one case later than the round before, so no case
    always runs right after the same neighbour. Returns one :class:`Measurement` per case name;
    a sample is the time of one call of ``fn`` (``number`` calls averaged).
    """
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate case names in {names}")
    for _ in range(warmup):
        for case in cases:
            time_sample(case)
    samples: dict[str, list[int]] = {c.name: [] for c in cases}
    k = len(cases)
    for r in range(repeat):
        for i in range(k):
            case = cases[(r + i) % k]
            samples[case.name].append(time_sample(case))
    return {c.name: Measurement(c.name, samples[c.name], c.work, c.unit) for c in cases}


def faster(*ms: Measurement) -> Measurement:
    """The measurement with the lowest median time per unit of work."""
    return min(ms, key=lambda m: m.ns_per_unit(m.median_ns))


@dataclass
class Row:
    """One line of a comparison: ours against a baseline, with an optional target ratio."""

    label: str
    ours: Measurement
    base: Measurement
    target: float | None = None  # None: shown for comparison only ("info")
    note: str = ""

    @property
    def ratio(self) -> float:
        """How many times faster ours is than the baseline, from the medians (>1: ours faster)."""
        return self.base.ns_per_unit(self.base.median_ns) / self.ours.ns_per_unit(self.ours.median_ns)

    @property
    def ratio_best(self) -> float:
        return self.base.ns_per_unit(self.base.best_ns) / self.ours.ns_per_unit(self.ours.best_ns)

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "info"
        return "PASS" if self.ratio >= self.target else "FAIL"


@dataclass
class Section:
    """A titled group of rows plus every raw measurement behind them."""

    title: str
    rows: list[Row] = field(default_factory=list)
    raw: list[Measurement] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


TABLE_HEADER = ("| benchmark | ours: median (best) | baseline | baseline: median (best) "
                "| ratio (best) | target | result |")
TABLE_RULE = "|---|---|---|---|---|---|---|"


def format_row(row: Row) -> str:
    target = f">= {row.target:.2f}x" if row.target is not None else "-"
    return (f"| {row.label} | {row.ours.median} ({row.ours.best}) | {row.base.name} "
            f"| {row.base.median} ({row.base.best}) | **{row.ratio:.2f}x** ({row.ratio_best:.2f}x) "
            f"| {target} | {row.verdict} |")


def print_section(section: Section, raw: bool = True) -> None:
    """A Markdown table (readable as plain text, pasteable into the README), then the raw figures."""
    print(f"\n### {section.title}\n")
    print(TABLE_HEADER)
    print(TABLE_RULE)
    for row in section.rows:
        print(format_row(row))
    for note in section.notes:
        print(f"\n{note}")
    if raw and section.raw:
        print("\nraw measurements (median, best, worst over the timed repetitions):")
        for m in section.raw:
            print(f"  {m.summary()}")
    print(flush=True)


def print_summary(sections: Sequence[Section]) -> tuple[int, int]:
    """Every row of every section in one table; returns ``(passed, failed)``."""
    print("\n## Summary\n")
    print(TABLE_HEADER)
    print(TABLE_RULE)
    passed = failed = 0
    for section in sections:
        for row in section.rows:
            print(format_row(row))
            if row.verdict == "PASS":
                passed += 1
            elif row.verdict == "FAIL":
                failed += 1
    print(f"\n{passed} PASS, {failed} FAIL (ratio = baseline time / our time from the medians; "
          "the ratio from the best repetitions in brackets)", flush=True)
    return passed, failed


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def machine_speed() -> str:
    """How fast this machine runs Python and system calls (the two scale differently from one
    machine to the next, and every ratio here is a mix of them): an empty loop iteration,
    ``os.getppid()`` and ``os.stat`` of a tmpfs file, each the best of 5 rounds."""
    import tempfile

    def best(fn: Callable[[], object], n: int) -> float:
        times = []
        for _ in range(5):
            t = time.perf_counter_ns()
            for _ in range(n):
                fn()
            times.append((time.perf_counter_ns() - t) / n)
        return min(times)

    def loop(n: int = 200_000) -> float:
        times = []
        for _ in range(5):
            t = time.perf_counter_ns()
            for _ in range(n):
                pass
            times.append((time.perf_counter_ns() - t) / n)
        return min(times)

    with tempfile.NamedTemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as f:
        stat_ns = best(lambda: os.stat(f.name), 20_000)
    return (f"empty Python loop {loop():.0f} ns/iteration, os.getppid() {best(os.getppid, 50_000):.0f} ns, "
            f"os.stat on tmpfs {stat_ns / 1000:.2f} us")
