import pytest

from benchmarks.harness import MAIN_THRESHOLD, _around, _layer_counters, _layers_ms


def test_a_repeat_is_judged_against_the_mean_of_the_bare_figures_around_it() -> None:
    """The rates and the threshold's bound averaged, both bounds kept; the other bounds
    and keys are those measured first."""
    main, other = str(MAIN_THRESHOLD), str(MAIN_THRESHOLD + 1)
    before = {
        "reencrypt_rate_per_core": 2000.0,
        "wire_reencrypt_rate_per_core": 1500.0,
        "bounds_ms": {main: 4.5, other: 6.0},
        "effective_cores": 1.9,
    }
    after = {
        "reencrypt_rate_per_core": 3000.0,
        "wire_reencrypt_rate_per_core": 1400.0,
        "bounds_ms": {main: 3.0, other: 5.0},
        "effective_cores": 1.3,
    }
    assert _around(before, after) == {
        "reencrypt_rate_per_core": 2500.0,
        "wire_reencrypt_rate_per_core": 1450.0,
        "bounds_ms": {main: 3.75, other: 6.0},
        "effective_cores": 1.9,
        "bound_before_ms": 4.5,
        "bound_after_ms": 3.0,
    }


def test_layers_are_read_from_the_histograms_of_coordinator_and_nodes() -> None:
    """Every read method of every node counts; the coordinator's handler only for
    Reencrypt; means are seconds over calls, in ms."""
    coordinator = {
        'kms_coordinator_request_duration_seconds_sum{method="Reencrypt"}': 2.0,
        'kms_coordinator_request_duration_seconds_count{method="Reencrypt"}': 400.0,
        'kms_coordinator_request_duration_seconds_sum{method="RetryReencrypt"}': 9.0,
        'kms_coordinator_node_call_duration_seconds_sum{node="node-1"}': 1.0,
        'kms_coordinator_node_call_duration_seconds_count{node="node-1"}': 600.0,
        'kms_coordinator_node_call_duration_seconds_sum{node="node-2"}': 0.5,
        'kms_coordinator_node_call_duration_seconds_count{node="node-2"}': 300.0,
    }
    nodes = [
        {
            'kms_node_request_duration_seconds_sum{method="Reencrypt"}': 0.6,
            'kms_node_request_duration_seconds_count{method="Reencrypt"}': 500.0,
            'kms_node_request_duration_seconds_sum{method="GetNodeInfo"}': 7.0,
            'kms_node_request_duration_seconds_count{method="GetNodeInfo"}': 7.0,
        },
        {
            'kms_node_request_duration_seconds_sum{method="ReencryptMany"}': 0.3,
            'kms_node_request_duration_seconds_count{method="ReencryptMany"}': 100.0,
        },
    ]
    before = {k: 0.0 for k in _layer_counters({}, [])}
    grown = _layer_counters(coordinator, nodes)
    assert grown == {
        "coordinator_s": 2.0,
        "coordinator_calls": 400.0,
        "node_call_s": 1.5,
        "node_calls": 900.0,
        "node_handler_s": pytest.approx(0.9),
        "node_handled": 600.0,
    }
    reads = 400
    phase = {"mean_ms": 7.0, "per_request": {k: (grown[k] - before[k]) / reads for k in grown}}
    assert _layers_ms(phase) == {
        "app_ms": 7.0,
        "coordinator_ms": pytest.approx(5.0),
        "node_call_ms": pytest.approx(1.5 / 900 * 1000),
        "node_handler_ms": pytest.approx(1.5),
    }


def test_a_layer_with_no_calls_over_the_phase_has_no_mean() -> None:
    phase = {"mean_ms": 3.0, "per_request": {"coordinator_s": 0.0, "coordinator_calls": 0.0}}
    assert _layers_ms(phase)["coordinator_ms"] is None
    assert _layers_ms(phase)["node_handler_ms"] is None
