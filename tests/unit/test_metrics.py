"""The figures' arithmetic: histogram buckets, adding workers up, keeping exited workers' counters,
and the Grafana dashboard naming only metrics the server exports."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from wsapp.metrics import Histogram, Stats, merge
from wsapp.metrics_share import RETIRED, WorkerShare

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"


def snapshot(stats: Stats, connections: int = 0) -> dict:
    stats.connections = connections
    return stats.export({"rooms": 1, "broker_healthy": 1.0}, {"broker_reconnects": 2})


def test_histogram_buckets_are_upper_bounds_inclusive() -> None:
    h = Histogram((1, 10))
    for v in (0.5, 1, 5, 10, 11):
        h.observe(v)
    h.observe(3, n=4)
    assert h.counts == [2, 6, 1] and h.sum == 0.5 + 1 + 5 + 10 + 11 + 12


def test_merge_adds_counters_histograms_and_live_gauges_only() -> None:
    a, b, gone = Stats(), Stats(), Stats()
    a.messages_in, b.messages_in, gone.messages_in = 3, 4, 5
    a.closes[("1000", "client", "client")] += 1
    b.closes[("1000", "client", "client")] += 2
    b.fanout_seconds.observe(0.001)
    total = merge([snapshot(a, 2), snapshot(b, 3), snapshot(gone, 7)], live=2)
    assert total["counters"]["messages_in"] == 12 and total["counters"]["broker_reconnects"] == 6
    assert total["labelled"]["closes"] == [["1000", "client", "client", 3]]
    assert sum(total["histograms"]["fanout_seconds"][1]) == 1
    assert total["gauges"]["connections"] == 5 and total["gauges"]["broker_healthy"] == 1.0
    assert total["workers"] == 2 and total["process"]["process_resident_memory_bytes"] > 0


def test_an_exited_workers_counters_stay_and_its_file_goes(tmp_path: Path) -> None:
    me, other = WorkerShare(str(tmp_path), pid=os.getpid()), WorkerShare(str(tmp_path), pid=2**22 + 17)  # no such pid
    mine, theirs = Stats(), Stats()
    mine.messages_in, theirs.messages_in = 1, 10
    other.write(snapshot(theirs, connections=4))
    total = me.instance(snapshot(mine, connections=1))
    assert total["counters"]["messages_in"] == 11 and total["gauges"]["connections"] == 1 and total["workers"] == 1
    assert [p.name for p in tmp_path.glob("*.json")] == [RETIRED]  # the dead one folded in
    me.retire(snapshot(mine))
    assert json.loads((tmp_path / RETIRED).read_bytes())["counters"]["messages_in"] == 11
    assert [p.name for p in tmp_path.glob("*.json")] == [RETIRED]


def test_the_dashboard_uses_only_exported_metric_names() -> None:

    from wsapp.app import create_app

    app = create_app()
    text = app.test_client().get("/metrics").get_data(as_text=True)
    families = list(text_string_to_metric_families(text))
    exported = {s.name for f in families for s in f.samples}
    exported |= {f"{f.name}_total" for f in families if f.type == "counter"}  # labelled ones with no samples yet
    exprs = " ".join(t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"])
    used = set(re.findall(r"\b(?:wsapp|process)_[a-z_]+", exprs))
    assert used and used - exported <= {"wsapp_broker_reconnects_total"}, used - exported  # Redis only
