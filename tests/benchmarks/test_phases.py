from benchmarks.phases import Read, phase, table


def test_a_phase_counts_the_reads_started_in_it_and_the_latencies_of_those_served() -> None:
    reads = [
        Read(0.5, 0.010, None),  # before the phase
        Read(1.0, 0.020, None),
        Read(1.5, 0.040, None),
        Read(1.9, 5.000, "UNAVAILABLE: node down"),
        Read(2.0, 0.030, None),  # at its end: the next phase's
    ]
    summary = phase(reads, 1.0, 2.0)
    assert summary["sent"] == 3
    assert summary["failed"] == 1
    assert summary["errors"] == {"UNAVAILABLE: node down": 1}
    assert summary["p50_ms"] == 30.0  # of the two served: 20 and 40 ms
    assert summary["p99_ms"] == 39.8


def test_the_table_has_a_line_per_phase() -> None:
    reads = [Read(t / 10, 0.01, None) for t in range(30)]
    rows = [
        (
            "partition",
            {p: phase(reads, i, i + 1) for i, p in enumerate(["before", "during", "after"])},
        )
    ]
    lines = table(rows, "fault").splitlines()
    assert lines[0].startswith("| fault | phase | sent | failed")
    assert [line.split(" | ")[1:3] for line in lines[2:]] == [
        ["before", "10"], ["during", "10"], ["after", "10"],
    ]  # fmt: skip
