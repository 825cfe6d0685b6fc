"""Throughput and latency harness for medkms (issue 5); run ``python -m benchmarks.harness``."""
