from benchmarks.harness import MAIN_THRESHOLD, _around


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
