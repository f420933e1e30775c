"""The fleet benchmark's pure pieces (``bench/fleet_runner.py``, ``bench/valkey.py``): what
the daemons' polled modes say around a fault, and a cluster's ``CLUSTER NODES``."""

from __future__ import annotations

from bench.fleet_runner import RPM_KEY, SHARED, refusals_by_mode, settling
from bench.valkey import parse_cluster_nodes

LOCAL = "local, reachable False"


def test_rpm_key_is_the_engines_key_of_the_limit() -> None:
    assert RPM_KEY == "{fleet-bench:provider:rpm:requests_per_minute}:minute"


def test_settling_times_the_last_daemon_back_for_good() -> None:
    changes = [
        [(0.0, SHARED), (10.5, LOCAL), (31.0, SHARED)],
        [(0.0, SHARED), (10.7, LOCAL), (31.5, SHARED), (31.8, LOCAL), (32.5, SHARED)],
        [(0.0, SHARED)],  # never left
    ]
    figures = settling(changes, fault=10.0, back=30.0)
    assert figures["daemons"] == 3
    assert figures["left_shared"] == 2
    assert figures["first_left_s"] == 0.5
    assert figures["shared_again_s"] == 2.5
    assert figures["flaps_after_back"] == 1
    assert figures["not_shared_at_end"] == 0


def test_settling_none_while_a_daemon_is_not_shared_and_zero_if_none_left() -> None:
    stuck = [[(0.0, SHARED), (11.0, LOCAL)], [(0.0, SHARED)]]
    assert settling(stuck, fault=10.0, back=20.0)["shared_again_s"] is None
    assert settling(stuck, fault=10.0, back=20.0)["not_shared_at_end"] == 1
    calm = [[(0.0, SHARED)], [(0.0, SHARED)]]
    assert settling(calm, fault=10.0, back=20.0)["shared_again_s"] == 0.0
    assert settling(calm, fault=10.0, back=20.0)["left_shared"] == 0


def test_refusals_are_put_by_the_mode_their_daemon_was_seen_in() -> None:
    changes = [[(0.0, SHARED), (11.0, LOCAL), (25.0, SHARED)], [(0.0, SHARED)]]
    limited_at = [(5.0, 0), (10.5, 0), (12.0, 0), (12.0, 1), (26.0, 0), (40.0, 0)]
    figures = refusals_by_mode(changes, limited_at, since=10.0, until=30.0)
    assert figures["while_shared"] == 3  # 10.5 and 26.0 on daemon 0, 12.0 on daemon 1
    assert figures["while_not_shared"] == 1
    assert figures["not_shared_at"] == [[2.0, 0]]


def test_cluster_nodes_are_parsed_with_roles_slots_and_myself() -> None:
    text = (
        "a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460\n"
        "b2 127.0.0.1:7001@17001 master,fail - 0 0 2 connected 5461-10922 [10923->-c3]\n"
        "c3 127.0.0.1:7002@17002 slave b2 0 0 2 connected\n"
    )
    nodes = parse_cluster_nodes(text)
    assert [n.port for n in nodes] == [7000, 7001, 7002]
    assert (nodes[0].myself, nodes[0].master) == (True, True)
    assert nodes[0].serves(5460)
    assert not nodes[0].serves(5461)
    assert nodes[1].failed
    assert nodes[1].slots == ((5461, 10922),)
    assert (nodes[2].master, nodes[2].master_id, nodes[2].myself) == (False, "b2", False)
