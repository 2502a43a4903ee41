"""The bench's closing line and exit status count every table's misses (issue #29):
``--only roundtrip`` printed a FAIL row and then "0 target(s) missed"."""

from __future__ import annotations

from bench import report, rt_report


def roundtrip_doc(cold_local_p50: float) -> dict:
    """What ``python -m bench --only roundtrip`` records: no main-table results."""
    return {"roundtrip": {"local": {
        "warm_inotify_events": {"latency_ms": {"p50": 5.0, "p99": 9.0}},
        "cold_inotify_events": {"latency_ms": {"p50": cold_local_p50}}}}, "results": {}}


def test_a_fail_row_of_the_round_trip_table_is_a_missed_target_and_exit_1() -> None:
    issue13 = rt_report.summarize(roundtrip_doc(78.1))
    assert "FAIL" in rt_report.table(issue13)
    main_table = report.summarize({}, (1, 10), 10)  # nothing of the first table ran
    line, rc = report.verdict(main_table, issue13, [])
    assert line == "1 target(s) missed in events mode: cold round trip, local p50"
    assert rc == 1


def test_all_met_is_a_clean_pass() -> None:
    issue13 = rt_report.summarize(roundtrip_doc(40.0))
    assert "FAIL" not in rt_report.table(issue13)
    line, rc = report.verdict(report.summarize({}, (1, 10), 10), issue13, [])
    assert (line, rc) == ("0 target(s) missed in events mode", 0)


def test_misses_of_both_tables_and_errors_all_count() -> None:
    main_table = [{"metric": "latency p50", "pass_events": False},
                  {"metric": "idle CPU", "pass_events": True}]
    line, rc = report.verdict(main_table, rt_report.summarize(roundtrip_doc(78.1)), ["events/burst"])
    assert line == ("2 target(s) missed in events mode: latency p50, cold round trip, local "
                    "p50; errors in events/burst")
    assert rc == 1
    assert report.verdict(main_table[1:], [], ["events/burst"])[1] == 1  # an error alone fails too
