"""Dual-stack affinity: an MPTCP connection opened over IPv4 gets a subflow over IPv6, to the v6 VIP
of the same service, and the balancer sends it to the same backend (the token has no family)."""
import json

from netlab import KERNEL, MB, NO_WRONG_JOINS, counters, delta, fetch, serving, wrong_joins

from mplb_nfq.lab.lab import PORT
from mplb_nfq.lab.netns import VIP6

pytestmark = KERNEL
COUNT_V6_JOINS = (f"add table inet probe; add chain inet probe c {{ type filter hook prerouting priority -400; }}; "
                  f"add rule inet probe c ip6 daddr {VIP6} tcp dport {PORT} tcp flags & (syn | ack) == syn "
                  f"tcp option mptcp subtype 1 counter")


def test_an_ipv6_subflow_of_an_ipv4_connection_reaches_the_same_backend(topo, worker):
    worker("mplb")
    topo.dual_stack_paths()  # the only extra subflow: to the IPv6 VIP the server's ADD_ADDR announces
    topo.exec("lb", "nft", COUNT_V6_JOINS)
    try:
        before = counters(topo)
        (result,) = fetch(topo, 30 * MB, mapped=True)  # AF_INET6 socket, IPv4 first subflow
        after = counters(topo)
        assert result["received"] == 30 * MB
        home = serving(before, after)
        assert delta(before, after, "MPTcpExtAddAddrTx")[home] >= 1  # the backend announced its v6 VIP
        assert delta(before, after, "MPTcpExtMPJoinAckRx") == {n: int(n == home) for n in topo.backend_names}
        assert wrong_joins(before, after) == NO_WRONG_JOINS
        rules = json.loads(topo.exec("lb", "nft", "-j", "list", "chain", "inet", "probe", "c",
                                     capture_output=True).stdout)["nftables"]
        counter = next(e["counter"] for item in rules if "rule" in item for e in item["rule"]["expr"]
                       if "counter" in e)
        assert counter["packets"] >= 1  # the join went over IPv6
    finally:
        topo.exec("lb", "nft", "delete table inet probe")
        topo.dual_stack_paths(on=False)
