"""Reading a service's Prometheus ``/metrics`` page, as the local cluster's tests and
benchmarks count with it: every sample by its series, and a metric's total over its labels."""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping


def scrape(url: str, *, timeout_s: float = 5.0) -> dict[str, float]:
    """Every sample on the page at ``url``, by its series as written
    (``name{label="value",...}``)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as answer:  # noqa: S310 (an operator's URL)
        text = answer.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            # The value is after the last space: label values may hold spaces.
            series, _, value = line.rpartition(" ")
            samples[series] = float(value)
    return samples


def total(samples: Mapping[str, float], name: str) -> float:
    """The sum of metric ``name``'s samples over all its label values; 0 if it has none."""
    return sum(
        value
        for series, value in samples.items()
        if series == name or series.startswith(name + "{")
    )
