from benchmarks.harness import MAIN_THRESHOLD, _faster


def test_a_repeat_is_judged_against_the_faster_of_the_bare_figures_around_it() -> None:
    """Each figure on its own: the higher rates and the lower bound, whichever
    measurement they came from; the other bounds and keys are those measured first."""
    main, other = str(MAIN_THRESHOLD), str(MAIN_THRESHOLD + 1)
    before = {
        "reencrypt_rate_per_core": 2000.0,
        "wire_reencrypt_rate_per_core": 1500.0,
        "bounds_ms": {main: 4.55, other: 6.0},
        "effective_cores": 1.9,
    }
    after = {
        "reencrypt_rate_per_core": 2900.0,
        "wire_reencrypt_rate_per_core": 1400.0,
        "bounds_ms": {main: 2.97, other: 5.0},
        "effective_cores": 1.3,
    }
    assert _faster(before, after) == {
        "reencrypt_rate_per_core": 2900.0,
        "wire_reencrypt_rate_per_core": 1500.0,
        "bounds_ms": {main: 2.97, other: 6.0},
        "effective_cores": 1.9,
    }
    assert _faster(after, before)["bounds_ms"][main] == 2.97
