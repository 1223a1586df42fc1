"""securecc-monitor --web's model: successive statuses become states, rates, percentiles and probe series."""

from __future__ import annotations

from typing import Any

from securecc.client.farmview import WINDOW, HostSeries, State, increase, percentile


def status(time: float, allowed: float = 0, refused: float = 0, busy: float = 0, slots: int = 4, running: int = 0,
           **extra: Any) -> dict[str, Any]:
    return {"ok": True, "server": "build1", "slots": slots, "time": time,
            "totals": {"allowed": allowed, "refused": refused, "busy": busy},
            "running": [{"principal": "alice@TEST.REALM", "compiler": "gcc", "source": f"{i}.c", "started": time - 3}
                        for i in range(running)], **extra}


def test_rates_come_from_successive_totals_over_the_servers_own_clock() -> None:
    """Two reads 2 s apart (server time) with 6 more jobs: 3 jobs/s, whatever the monitor's own clock did."""
    s = HostSeries("b:1")
    s.status_received(status(100, allowed=10, refused=1), now=1000)
    assert not s.jobs_per_s  # one read is no rate
    s.status_received(status(102, allowed=16, refused=2, busy=4), now=1005)
    assert list(s.jobs_per_s) == [(1005, 3.0)] and list(s.refusals_per_s) == [(1005, 0.5)] and list(s.busy_per_s) == [(1005, 2.0)]


def test_a_restarted_server_is_a_counter_reset_not_a_negative_rate() -> None:
    assert increase(50, 3) == 3 and increase(3, 5) == 2
    s = HostSeries("b:1")
    s.status_received(status(100, allowed=50), now=0)
    s.status_received(status(101, allowed=3), now=1)
    assert list(s.jobs_per_s) == [(1, 3.0)]


def test_a_down_host_leaves_a_gap_and_its_reason() -> None:
    s = HostSeries("b:1")
    s.status_received(status(100), now=0)
    s.status_received({"host": "b:1", "ok": False, "error": "cannot connect to b:1: Connection refused"}, now=2)
    view = s.view(now=2)
    assert view.state is State.DOWN and view.error.startswith("cannot connect") and view.jobs_per_s == ((2, None),)


def test_states_busy_backed_off_and_quarantined_in_order_of_seriousness() -> None:
    s = HostSeries("b:1")
    s.status_received(status(100, slots=1, running=1), now=0)
    assert s.view(0).state is State.BUSY and s.view(0).in_use == 1
    backed = s.view(0, backed_off=12.0)
    assert backed.state is State.BACKED_OFF and backed.flags == (State.BACKED_OFF, State.BUSY)
    quarantine = {"since": 1.0, "why": "result differs from a local compile", "job_id": "ab12"}
    assert s.view(0, backed_off=12.0, quarantine=quarantine).state is State.QUARANTINED
    s.status_received(status(102, slots=4, running=1), now=2)
    assert s.view(2).state is State.OK and s.view(2).flags == ()


def test_percentiles_over_the_window_from_the_servers_recent_durations() -> None:
    """p50/p95 are nearest-rank over the last ten minutes by the server's clock; older jobs drop out; a job seen in
    two statuses counts once."""
    assert percentile([], 50) is None and percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([1.0] * 19 + [9.0], 95) == 1.0
    s = HostSeries("b:1")
    old = [[1000.0 - WINDOW - 1, 60.0]]  # older than the window: left out
    s.status_received(status(1000, recent_durations=old + [[900.0 + i, round(0.1 * (i + 1), 1)] for i in range(10)]), now=0)
    s.status_received(status(1002, recent_durations=[[909.0, 1.0], [1001.0, 5.0]]), now=2)
    view = s.view(2)
    assert len(s.durations) == 11
    assert view.p50 == 0.6 and view.p95 == 5.0


def test_probe_latency_series_with_failures_as_gaps() -> None:
    s = HostSeries("b:1")
    s.probe_received({"ok": True, "latency_ms": 41.5}, now=0)
    s.probe_received({"ok": False, "error": "busy (1/1)", "latency_ms": 3.0}, now=15)
    assert s.view(15).probe_ms == ((0, 41.5), (15, None)) and s.view(15).probe_error == "busy (1/1)"
    assert s.view(15).last_probe_ms is None
    s.probe_received({"ok": True, "latency_ms": 12.0}, now=WINDOW + 20)  # the first two are out of the window now
    assert s.view(WINDOW + 20).probe_ms == ((WINDOW + 20, 12.0),)


def test_divergences_refusals_and_running_jobs_are_carried_as_the_server_said() -> None:
    s = HostSeries("b:1")
    s.status_received(status(100, running=2, divergences=3, refusals={"denied:not-in-group": 4}), now=0)
    view = s.view(0)
    assert view.divergences == 3 and dict(view.refusals) == {"denied:not-in-group": 4}
    assert [(j.source, j.seconds) for j in view.jobs] == [("0.c", 3.0), ("1.c", 3.0)]
    s.status_received(status(102), now=2)  # a server without the newer keys
    assert s.view(2).divergences == 0 and dict(s.view(2).refusals) == {}
