"""Stateless joins (joins = "announced-port"), on the real kernel: the backends set the C flag and
announce a join port of the VIP of their own; the client's joins go there and the ruleset maps
each such port to its backend, with nothing learned."""
import json
import sys

import pytest
from conftest import lab_topology
from netlab import KERNEL, MB, NO_WRONG_JOINS, counters, delta, fetch, nft_counters, wrong_joins

from mplb_nfq.lab.lab import JOIN_PORT_BASE, config_text

pytestmark = KERNEL


@pytest.fixture(scope="module", params=["routed", "dsr"])
def topo(request):
    for t in lab_topology(direct_return=request.param == "dsr"):
        t.announce_join_ports(JOIN_PORT_BASE)
        yield t


def announced_config(topo, tmp_path) -> str:
    return config_text("mplb", 2, tmp_path, direct_return=topo.direct_return, joins="announced-port")


def test_every_join_reaches_its_backend_with_no_worker_to_learn_anything(topo, worker, tmp_path):
    w = worker("mplb", text=announced_config(topo, tmp_path))
    status = json.loads(topo.exec("lb", sys.executable, "-m", "mplb_nfq", "status", "--json", "-c",
                                  str(w.config_path), capture_output=True).stdout)
    assert status["services"][0]["join_ports"] == {"b1": JOIN_PORT_BASE, "b2": JOIN_PORT_BASE + 1}
    w.stop(cleanup=False)  # the kernel state stays: tables, join ports; nobody learns tokens now
    try:
        before = counters(topo)
        results = fetch(topo, *[2 * MB] * 4, pause=0.1)
        after = counters(topo)
        assert [r["received"] for r in results] == [2 * MB] * 4
        capable = delta(before, after, "MPTcpExtMPCapableSYNRX")
        assert delta(before, after, "MPTcpExtMPJoinAckRx") == capable  # each join on its connection's backend
        assert wrong_joins(before, after) == NO_WRONG_JOINS
        assert sum(capable.values()) == 4
        assert topo.direct_return or all(capable.values())  # round robin in turns (DSR: a hash of each connection)
        nft = nft_counters(topo)
        assert nft["join_port"] >= 4 and nft["queued_join"] == 0 and nft["join_kernel_hit"] == 0
    finally:
        topo.exec("lb", sys.executable, "-m", "mplb_nfq", "cleanup", "-c", str(w.config_path))


def test_a_client_that_accepts_no_announcement_is_served_and_its_joins_follow_their_token(topo, worker, tmp_path):
    """Its endpoint is not fullmesh and it accepts no ADD_ADDR: it is served all the same, and
    whatever join it opens reaches its connection's backend (this kernel's client still takes one
    announcement from a server that set the C flag; an older one keeps its one subflow, or joins
    the VIP's own port, where its token steers it)."""
    worker("mplb", text=announced_config(topo, tmp_path))
    topo.exec("client", "ip", "mptcp", "limits", "set", "subflows", "4", "add_addr_accepted", "0")
    topo.exec("client", "ip", "mptcp", "endpoint", "flush")
    topo.exec("client", "ip", "mptcp", "endpoint", "add", topo.client_addresses[1], "subflow")
    try:
        before = counters(topo)
        (result,) = fetch(topo, 2 * MB)
        after = counters(topo)
        assert result["received"] == 2 * MB
        assert sum(delta(before, after, "MPTcpExtMPCapableSYNRX").values()) == 1
        joins = sum(delta(before, after, "MPTcpExtMPJoinSynRx").values())
        assert sum(delta(before, after, "MPTcpExtMPJoinAckRx").values()) == joins
        assert wrong_joins(before, after) == NO_WRONG_JOINS
        nft = nft_counters(topo)
        assert nft["join_port"] + nft["join_kernel_hit"] + nft["queued_join"] >= joins
    finally:
        topo.announce_join_ports(JOIN_PORT_BASE)
