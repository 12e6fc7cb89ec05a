"""Tunnelled backends: not on the LB's segment but behind a router, each reached through a tunnel
of its own, VXLAN or IPIP (where the kernel has it: not this project's); MPTCP affinity holds."""
import json
import sys

import pytest
from conftest import lab_topology
from netlab import KERNEL, MB, NO_WRONG_JOINS, counters, delta, fetch, serving, wrong_joins

pytestmark = KERNEL


def kernel_has(kind: str) -> bool:
    from mplb_nfq.ops.check import _tunnel_support

    return _tunnel_support()[kind] is None


@pytest.fixture(scope="module", params=["vxlan", "ipip"])
def topo(request):
    if not kernel_has(request.param):
        pytest.skip(f"this kernel cannot make {request.param} devices (`mplb-nfq check` says so)")
    yield from lab_topology(tunnel=request.param)


def test_both_subflows_reach_one_tunnelled_backend_over_a_routed_path(topo, worker):
    w = worker("mplb")
    devices = topo.exec("lb", "ip", "-d", "link", "show", "type", topo.tunnel, capture_output=True).stdout
    assert "mplbt100" in devices and "remote 10.0.71.2" in devices
    before = counters(topo)
    (result,) = fetch(topo, 5 * MB)
    after = counters(topo)
    assert result["received"] == 5 * MB
    home = serving(before, after)
    assert delta(before, after, "MPTcpExtMPJoinAckRx") == {n: int(n == home) for n in topo.backend_names}
    assert wrong_joins(before, after) == NO_WRONG_JOINS
    status = json.loads(topo.exec("lb", sys.executable, "-m", "mplb_nfq", "status", "--json", "-c",
                                  str(w.config_path), capture_output=True).stdout)
    assert all(b["state"] == "up" for b in status["services"][0]["backends"])  # health checks through the tunnel
    w.stop()
    assert "mplbt" not in topo.exec("lb", "ip", "link", capture_output=True).stdout  # the devices went too


def test_an_unaware_balancer_breaks_the_join_through_tunnels_too(topo, worker):
    worker("unaware")
    before = counters(topo)
    (result,) = fetch(topo, 2 * MB)
    after = counters(topo)
    assert result["received"] == 2 * MB
    home = serving(before, after)
    missed = delta(before, after, "misrouted")
    assert missed[home] == 0 and sum(missed.values()) >= 1
