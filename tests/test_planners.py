"""The kernel adapters' pure planners: the ruleset rendered from the config, the routing plan, the
token map's nfnetlink messages, and the ruleset's model that `inspect` replays. (The kernel tests
load what they produce; these pin what they produce.)"""
import ipaddress
import socket
import struct

from mplb_nfq.lab.packets import ACK, SERVER_KEY, SYN, dss, mp_capable, mp_join_ack, mp_join_syn, tcp

from mplb_nfq.core.balancer import LookupTable
from mplb_nfq.core.jhash import flow_key, slot
from mplb_nfq.core.marks import BACKEND_MASK, JOIN, LEARNED, PROVISIONAL, QUEUE, REJECT
from mplb_nfq.core.packet import parse_ip, token_of_key
from mplb_nfq.core.schedulers import Index
from mplb_nfq.core.tokens import flow_comment, flow_of_comment
from mplb_nfq.kernel.copies import bind_request, parse_copies
from mplb_nfq.kernel.nft import KernelError
from mplb_nfq.kernel.routing import MAIN_TABLE, routing_plan
from mplb_nfq.kernel.ruleset import (
    OPERATOR_COMMENT,
    WORKER_COMMENT,
    Decider,
    classify,
    render_decide,
    render_ruleset,
    unwanted_affinity,
    xtables_rule,
)
from mplb_nfq.kernel.nfnetlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_HEADER
from mplb_nfq.kernel.tokenmap import (
    Outline,
    NFT_MSG_DELSETELEM,
    NFT_MSG_GETOBJ,
    NFT_MSG_NEWSETELEM,
    counters_request,
    delete_batch,
    parse_counter,
    parse_elements,
    replace_batch,
    token_batch,
)
from mplb_nfq.ops.config import from_dict

CONFIG = {
    "services": [{"name": "web", "vips": ["10.0.100.1", "fd00:100::1"], "ports": [80, 443], "backends": ["b1", "b2"]},
                 {"name": "dsr", "vip": "10.0.200.1", "ports": [8080], "direct_return": True, "backends": ["b2"]}],
    "backends": [{"name": "b1", "addresses": ["10.0.9.11", "fd00:9::11"]},
                 {"name": "b2", "addresses": ["10.0.9.12", "fd00:9::12"], "weight": 2}],
}


def cfg(**kernel):
    return from_dict({**CONFIG, "kernel": kernel})


# -- the ruleset ---------------------------------------------------------------------------------
def test_the_ruleset_holds_the_config_s_vips_marks_and_queue_statement():
    text = render_ruleset(cfg(table_name="edge"), native=True, by_worker=True)
    assert "${" not in text and text.startswith("# mplb-nfq ruleset")
    assert "table inet edge {" in text and WORKER_COMMENT in text
    assert "elements = { 10.0.100.1 . 80, 10.0.100.1 . 443, 10.0.200.1 . 8080 }" in text
    assert "elements = { fd00:100::1 . 80, fd00:100::1 . 443 }" in text
    assert "elements = { 10.0.200.1 . 8080 }" in text  # only the direct-return VIP is untracked
    assert "queue num 0 bypass" in text
    assert f"ct mark & 0x{LEARNED | JOIN:08x} != 0 accept" in text
    assert f"meta mark & 0x{REJECT:08x} == 0x{REJECT:08x}" in text
    assert f"meta mark set meta mark & 0x{0xFFFFFFFF & ~QUEUE:08x}" in text


def test_without_nft_queue_the_ruleset_sets_a_mark_bit_that_one_xtables_rule_queues():
    text = render_ruleset(cfg(workers=3, queue=10), native=False)
    assert OPERATOR_COMMENT in text and "queue num" not in text
    assert f"meta mark set meta mark | 0x{QUEUE:08x}" in text
    rule = xtables_rule(cfg(workers=3, queue=10))
    assert rule[rule.index("--mark") + 1] == f"0x{QUEUE:x}/0x{QUEUE:x}"
    assert rule[rule.index("--queue-balance") + 1] == "10:12" and rule[-1] == "--queue-bypass"
    assert render_ruleset(cfg(workers=3, queue=10), native=True).count("queue num 10-12 bypass") == 1


def test_kernel_decisions_copy_the_handshake_and_the_queue_mode_holds_it():
    kernel, held = render_ruleset(cfg(), native=True), render_ruleset(cfg(handshakes="queue"), native=True)
    assert "daddr . tcp dport vmap @decide4" in kernel and "vmap" not in held
    assert "log group 0 snaplen 256 counter name copied_synack" in kernel
    assert "log group" not in held  # the queue holds the handshake, and a provisional token's proof
    assert "ct mark & 0x02000000 != 0 tcp option mptcp subtype 2 ct mark set ct mark & 0xfdffffff counter name " \
           "queued_proof goto to_queue" in held
    assert "counter name queued_synack goto to_queue" in held and "queued_synack goto" not in kernel


def test_persistence_keeps_a_set_of_clients_per_backend_and_only_available_ones_are_consulted():
    """A rule cannot change a map element's backend (an update keeps the old one), and listing a
    map of a million clients to delete a backend's stalled the loop: a set per backend instead,
    flushed when the backend takes no new connections."""
    persistent = from_dict({**CONFIG, "services": [{**CONFIG["services"][0], "persistence": 300}]})
    (b1, b2) = [b.mark for b in persistent.backends]
    only_b2 = {"web": LookupTable(Index.SOURCE, (b2,) * 4, affinity=300)}
    text = render_decide(persistent, only_b2)
    for version in (4, 6):
        for mark in (b1, b2):  # both exist, kept across rewrites
            assert f"add set inet mplb affinity{version}_{mark:x}_web {{ type ipv{version}_addr ; flags dynamic, timeout" in text
    assert f"ip saddr @affinity4_{b2:x}_web meta mark set 0x{b2:x}" in text
    assert f"@affinity4_{b1:x}_web meta" not in text  # b1 is not in the table: its clients choose again
    assert f"meta mark == 0 meta mark set jhash ip saddr mod 4" in text
    assert f"meta mark & 0x0000ffff == 0x{b2:x} update @affinity6_{b2:x}_web {{ ip6 saddr timeout 300s }}" in text
    listing = Outline("", frozenset(), {f"affinity4_{b1:x}_web": "set", f"affinity4_{b1:x}_gone": "set",
                                        "affinity4_web": "map", "tokens": "map"})
    assert unwanted_affinity(listing, persistent, only_b2) == {f"affinity4_{b1:x}_gone": "set", "affinity4_web": "map"}
    assert unwanted_affinity(listing, cfg(), {"web": LookupTable(Index.SOURCE, (b2,))}) == {
        f"affinity4_{b1:x}_web": "set", f"affinity4_{b1:x}_gone": "set", "affinity4_web": "map"}  # persistence off


def test_each_service_gets_a_chain_that_indexes_its_table_and_each_vip_points_at_it():
    c = cfg()
    tables = c.balancer().lookup_tables()
    text = render_decide(c, tables, gone=["old"])
    assert "add element inet mplb sched_web { 0x0 : 0x100, 0x1 : 0x101 }" in text
    assert "meta mark set numgen inc mod 2 map @sched_web counter name decided" in text
    # direct server return: the first ACK must find its SYN's backend again, so a hash, not a counter
    assert "meta mark set jhash ip saddr . tcp sport . ip daddr . tcp dport mod 1 seed" in text
    assert "add element inet mplb decide4 { 10.0.100.1 . 80 : jump svc_web, 10.0.100.1 . 443 : jump svc_web, " \
           "10.0.200.1 . 8080 : jump svc_dsr }" in text
    assert "add element inet mplb decide6 { fd00:100::1 . 80 : jump svc_web" in text
    assert text.index("flush map inet mplb decide4") < text.index("delete chain inet mplb svc_old")
    assert "decide4 {" not in render_decide(cfg(handshakes="queue"), {})  # held: no VIP is decided here


# -- routing ---------------------------------------------------------------------------------------
def test_a_maglev_table_goes_through_its_virtual_backends_and_a_backend_going_rewrites_only_theirs():
    from mplb_nfq.core.schedulers import VIRTUAL_PER_BACKEND
    from mplb_nfq.kernel.ruleset import Ruleset

    maglev = {**CONFIG, "services": [{**CONFIG["services"][0], "scheduler": "maglev", "maglev_size": 4099}]}
    config = from_dict({**maglev, "kernel": {"queue_mode": "native"}})
    balancer = config.balancer()
    before = balancer.lookup_tables()
    web = before["web"]
    assert len(web.slots) == 4099 and len(web.via) == 2 * VIRTUAL_PER_BACKEND and web.marks() == {0x100, 0x101}
    assert all(value & REJECT for value in web.slots)  # a number the kernel cannot find refuses the SYN
    text = render_decide(config, before)
    assert "add map inet mplb via_web { typeof meta mark : meta mark ; }" in text
    assert "meta mark set jhash ip saddr . tcp sport . ip daddr . tcp dport mod 4099 seed 0x" in text
    assert "map @sched_web meta mark set meta mark map @via_web counter name decided" in text
    assert f"add element inet mplb via_web {{ 0x{REJECT:x} : 0x100, 0x{REJECT | 1:x} : 0x100, " in text
    assert f"add element inet mplb sched_web {{ 0x0 : 0x{web.slots[0]:x}, " in text

    class Written:
        def __init__(self):
            self.maps, self.ran = [], []

        def write(self, maps):
            self.maps.append(maps)

        def run(self, commands):
            self.ran.append(commands)

    ruleset = Ruleset(Written(), config)
    ruleset.tables, ruleset.written_for, ruleset.slots = dict(before), config, ruleset.nft
    balancer.services[0].backends[0].healthy = False
    after = balancer.lookup_tables()
    ruleset.sync_tables(config, after)
    (written,) = ruleset.slots.maps
    assert written["sched_web"] == []  # the slots stay
    assert sorted(virtual for virtual, _ in written["via_web"]) == [REJECT | v for v in range(VIRTUAL_PER_BACKEND)]
    assert {mark for _, mark in written["via_web"]} == {0x101} and ruleset.tables["web"] is after["web"]
    assert ruleset.nft.ran == []  # no chain, no table written again through nft


def test_the_routing_plan_gives_each_backend_a_table_and_a_fwmark_rule_and_each_vip_a_fail_open_route():
    c = cfg()
    routes, rules = routing_plan(c)
    b1, b2 = c.backends
    assert dict(dst="10.0.100.1/32", table=b1.table, family=socket.AF_INET, gateway="10.0.9.11") in routes
    assert dict(dst="fd00:100::1/128", table=b1.table, family=socket.AF_INET6, gateway="fd00:9::11") in routes
    assert dict(dst="10.0.200.1/32", table=b2.table, family=socket.AF_INET, gateway="10.0.9.12") in routes
    assert not any(r["dst"] == "10.0.200.1/32" and r["table"] == b1.table for r in routes)  # b1 is not in dsr
    for b in (b1, b2):
        for family in (socket.AF_INET, socket.AF_INET6):
            assert dict(family=family, table=b.table, priority=c.rule_priority, fwmark=b.mark,
                        fwmask=BACKEND_MASK) in rules
    fallback = [r for r in routes if r["table"] == c.fallback_table and r["dst"] == "10.0.100.1/32"]
    assert fallback == [dict(dst="10.0.100.1/32", table=c.fallback_table, family=socket.AF_INET,
                             multipath=[{"gateway": "10.0.9.11"}, {"gateway": "10.0.9.12"}])]
    assert dict(family=socket.AF_INET, table=c.fallback_table, priority=c.rule_priority + 1, dst="10.0.100.1",
                dst_len=32) in rules
    for family in (socket.AF_INET, socket.AF_INET6):  # a raced join no worker took: dropped, never guessed
        assert dict(family=family, priority=c.rule_priority, fwmark=JOIN, fwmask=JOIN | BACKEND_MASK,
                    action="FR_ACT_BLACKHOLE") in rules


def test_a_retired_backend_keeps_its_routes_and_a_tunnelled_one_gets_a_device_and_a_host_route():
    c = from_dict({"services": [{"name": "web", "vip": "10.0.100.1", "ports": [80], "backends": ["t1"]}],
                   "backends": [{"name": "t1", "address": "10.0.50.2", "tunnel": "vxlan", "remote": "10.0.8.2",
                                 "vni": 7}]})
    gone = from_dict(CONFIG).backends[0]
    routes, rules = routing_plan(c, [(gone, ["10.0.100.1"])])
    (t1,) = c.backends
    assert dict(dst="10.0.100.1/32", table=t1.table, family=socket.AF_INET, gateway="10.0.50.2", dev=t1.device,
                onlink=True) in routes
    assert dict(dst="10.0.50.2/32", table=MAIN_TABLE, family=socket.AF_INET, dev=t1.device) in routes
    assert dict(dst="10.0.100.1/32", table=gone.table, family=socket.AF_INET, gateway="10.0.9.11") in routes
    assert any(r.get("fwmark") == gone.mark for r in rules)


# -- the token map's messages -----------------------------------------------------------------------
def messages(batch: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, sequence, body) of each netlink message of a batch."""
    found, offset = [], 0
    while offset < len(batch):
        length, kind, flags, seq, _ = NLMSG_HEADER.unpack_from(batch, offset)
        found.append((kind, flags, seq, batch[offset + NLMSG_HEADER.size:offset + length]))
        offset += length
    return found


def test_a_token_batch_is_one_transaction_whose_elements_read_back_as_written():
    tokens = [(0x11223344, 0x100 | JOIN), (0xDEADBEEF, 0x101 | JOIN)]
    batch = token_batch("mplb", tokens, 600, 30)
    (begin, add, end) = messages(batch)
    assert (begin[0], begin[2]) == (16, 30) and (end[0], end[2]) == (17, 32)
    assert add[0] == 10 << 8 | NFT_MSG_NEWSETELEM and add[1] & NLM_F_ACK and add[2] == 31
    assert b"mplb\0" in add[3] and b"tokens\0" in add[3]
    assert bytes.fromhex("11223344") in add[3]  # the key as on the wire, as nft's tcp option @30,32,32 reads it
    assert struct.pack("=I", 0x100 | JOIN) in add[3]  # the mark in host order, as meta mark holds it
    assert [(t, m) for t, m, _, _ in parse_elements(add[3])] == tokens
    assert {left for _, _, left, _ in parse_elements(add[3])} == {600.0}
    assert {comment for *_, comment in parse_elements(add[3])} == {None}


def test_an_element_s_comment_names_its_connection_and_reads_back():
    batch = token_batch("mplb", [(0x11223344, 0x100 | JOIN)], 600, 3, {0x11223344: "10.0.1.2:40000>10.0.100.1:80"})
    (_, add, _) = messages(batch)
    assert parse_elements(add[3]) == [(0x11223344, 0x100 | JOIN, 600.0, "10.0.1.2:40000>10.0.100.1:80")]
    assert bytes([0, 29]) + b"10.0.1.2:40000>10.0.100.1:80\0" in add[3]  # libnftnl's comment: type 0, length


def test_a_flow_s_comment_reads_back_whatever_its_addresses_families():
    # a peer's news may name a connection from an IPv4 client to an IPv6 VIP: named, never a crash
    v4, v6 = ipaddress.ip_address("10.0.1.2").packed, ipaddress.ip_address("fd00:100::1").packed
    for flow, text in (((v4, 40000, v4, 80), "10.0.1.2:40000>10.0.1.2:80"),
                       ((v6, 40000, v6, 80), "[fd00:100::1]:40000>[fd00:100::1]:80"),
                       ((v4, 40000, v6, 80), "10.0.1.2:40000>[fd00:100::1]:80"),
                       ((v6, 40000, v4, 80), "[fd00:100::1]:40000>10.0.1.2:80")):
        assert flow_comment(flow) == text
        assert flow_of_comment(text) == flow


def test_a_replace_deletes_then_adds_in_one_transaction_or_only_adds():
    kinds = [m[0] & 0xFF for m in messages(replace_batch("mplb", [(0xCAFE0001, REJECT)], 60, 7, True))]
    assert kinds == [16, NFT_MSG_DELSETELEM, NFT_MSG_NEWSETELEM, 17]
    kinds = [m[0] & 0xFF for m in messages(replace_batch("mplb", [(0xCAFE0001, REJECT)], 60, 7, False))]
    assert kinds == [16, NFT_MSG_NEWSETELEM, 17]
    (_, add, _) = messages(replace_batch("mplb", [(0xCAFE0001, REJECT)], 60, 7, False))
    assert [(t, m) for t, m, _, _ in parse_elements(add[3])] == [(0xCAFE0001, REJECT)]
    (_, delete, _) = messages(delete_batch("mplb", [1, 2], 9))
    assert delete[0] & 0xFF == NFT_MSG_DELSETELEM and bytes.fromhex("00000002") in delete[3]


def test_the_nflog_bind_asks_for_packet_copies_of_snaplen_bytes_sent_at_once():
    ((kind, flags, seq, body),) = messages(bind_request(7, 128, 1))
    assert kind == 4 << 8 | 1 and flags == NLM_F_REQUEST | NLM_F_ACK and seq == 1
    assert body[:4] == bytes([0, 0, 0, 7])  # family unspecified, version 0, group 7 (big endian)
    assert body[4:].startswith(bytes.fromhex("0500 0100 01 000000"))  # command: bind
    assert bytes.fromhex("0a00 0200 00000080 02 00") in body  # mode: copy the packet, 128 bytes
    assert bytes.fromhex("0800 0500 00000001") in body  # queue threshold 1


def test_copies_are_read_with_their_marks_and_what_is_not_a_copy_is_skipped():
    def copy(payload: bytes, mark: int | None) -> bytes:
        attributes = (struct.pack("=HH", 8, 2) + struct.pack("!I", mark) if mark is not None else b"") + \
            struct.pack("=HH", 4 + len(payload), 9) + payload + bytes(-len(payload) % 4)
        body = bytes([2, 0, 0, 7]) + attributes
        return NLMSG_HEADER.pack(16 + len(body), 4 << 8, 0, 0, 0) + body

    synack = tcp(VIP, "10.0.1.2", 80, 40000, SYN | ACK, mp_capable(1, 1, SERVER_KEY))
    other = NLMSG_HEADER.pack(20, 2, 0, 0, 0) + bytes(4)  # an acknowledgement
    found = parse_copies(copy(synack, 0x101) + other + copy(synack[:41], None))
    assert found == [(synack, 0x101), (synack[:41], 0)]
    assert parse_ip(found[0][0]).capable.sender_key == SERVER_KEY


# -- the ruleset's model ----------------------------------------------------------------------------
VIP = "10.0.100.1"
VIPS = {(ipaddress.ip_address(VIP).packed, 80)}


def model(packet: bytes, ct_mark=0, original=True, new=False, token_map=None):
    return classify(parse_ip(packet), ct_mark, original, new, VIPS, token_map or {})


def test_the_model_queues_syns_and_capable_handshakes_until_the_token_is_learned():
    assert model(tcp("10.0.1.2", VIP, flags=SYN), new=True).queued == "queued_syn"
    assert model(tcp("10.0.1.2", VIP, flags=SYN, options=mp_capable()), new=True).queued == "queued_syn"
    synack = tcp(VIP, "10.0.1.2", 80, 40000, SYN | ACK, mp_capable(1, 1, SERVER_KEY))
    assert model(synack, ct_mark=0x100, original=False) == (0x100, "queued_synack", False, None, False, None)
    assert model(synack, ct_mark=0x100 | LEARNED, original=False).queued is None
    third = tcp("10.0.1.2", VIP, flags=ACK, options=mp_capable(1, 1, SERVER_KEY, SERVER_KEY))
    assert model(third, ct_mark=0x100) == (0x100, "queued_capable", False, None, False, None)
    assert model(third, ct_mark=0x100 | LEARNED).queued is None
    assert model(tcp("10.0.1.2", VIP, flags=ACK), new=True).queued == "queued_first"  # mid-stream entry
    assert model(tcp("10.0.1.2", VIP, flags=ACK), ct_mark=0x100).queued is None
    assert model(tcp("10.0.1.2", "10.0.9.9", flags=SYN), new=True).queued is None  # not a VIP


def test_the_model_steers_a_join_whose_token_the_map_holds_and_queues_one_it_misses():
    token = token_of_key(SERVER_KEY, 1)
    join = tcp("10.0.2.2", VIP, 50000, 80, SYN, mp_join_syn(token))
    assert model(join, new=True, token_map={token: 0x101 | JOIN}) == (0x101 | JOIN, None, True, None, False, None)
    assert model(join, new=True, token_map={}).queued == "queued_syn"


def kernel_model(packet: bytes, index=Index.COUNTER, aware=True, turn=0, **state):
    deciders = {next(iter(VIPS)): Decider(LookupTable(index, (0x101, 0x102, 0x103)), aware)}
    return classify(parse_ip(packet), state.get("ct_mark", 0), state.get("original", True), state.get("new", True),
                    VIPS, state.get("token_map", {}), (), deciders, turn,
                    subflows=state.get("subflows"), join_flows=state.get("join_flows"))


def test_a_join_subflow_a_cluster_peer_steered_keeps_its_backend_when_it_arrives_mid_stream():
    moved = tcp("10.0.2.2", VIP, 50000, 80, ACK)
    flow = parse_ip(moved).flow
    subflows = {flow: 0x102 | JOIN | LEARNED}
    assert kernel_model(moved, Index.FLOW, subflows=subflows) == (0x102 | JOIN | LEARNED, None, False, None, False,
                                                                  "subflow_shared")
    hashed = kernel_model(moved, Index.FLOW)  # without the peer's word: its own hash, another backend maybe
    assert hashed.flow_map is None and hashed.decided
    assert kernel_model(moved, Index.FLOW, subflows=subflows, new=False).flow_map is None  # conntrack has it


def test_under_direct_server_return_a_joins_first_ack_finds_the_flow_its_syn_left():
    first_ack = tcp("10.0.2.2", VIP, 50000, 80, ACK, mp_join_ack())
    flows = {parse_ip(first_ack).flow: 0x101 | JOIN}
    assert kernel_model(first_ack, Index.FLOW, join_flows=flows) == (0x101 | JOIN, None, False, None, False,
                                                                     "join_first_ack")
    assert kernel_model(first_ack, Index.FLOW).flow_map is None
    data = tcp("10.0.2.2", VIP, 50000, 80, ACK)  # not a join's first ACK: the map is not asked
    assert kernel_model(data, Index.FLOW, join_flows={parse_ip(data).flow: 0x101 | JOIN}).flow_map is None


def test_the_kernel_decides_syns_from_the_table_and_copies_what_carries_the_server_key():
    plain, capable = tcp("10.0.1.2", VIP, 40000, 80, SYN), tcp("10.0.1.2", VIP, 40000, 80, SYN, mp_capable())
    assert kernel_model(plain, turn=4) == (0x102 | LEARNED, None, False, None, True, None)  # settled: nothing to learn
    assert kernel_model(capable, turn=2) == (0x103, None, False, None, True, None)  # its token is yet to learn
    assert kernel_model(capable, aware=False, turn=3) == (0x101 | LEARNED, None, False, None, True, None)
    by_flow = kernel_model(capable, Index.FLOW).mark
    assert by_flow == (0x101, 0x102, 0x103)[slot(flow_key(*parse_ip(capable).flow), 3)]
    assert kernel_model(capable, Index.WORKER).queued == "queued_syn"
    token = token_of_key(SERVER_KEY, 1)
    join = tcp("10.0.2.2", VIP, 50000, 80, SYN, mp_join_syn(token))
    assert kernel_model(join) == (JOIN, "queued_join", False, None, False, None)  # raced its token's copy: held
    assert kernel_model(join, token_map={token: 0x102 | JOIN}) == (0x102 | JOIN, None, True, None, False, None)
    synack = tcp(VIP, "10.0.1.2", 80, 40000, SYN | ACK, mp_capable(1, 1, SERVER_KEY))
    assert kernel_model(synack, ct_mark=0x101, original=False, new=False) == (0, None, False, "copied_synack", False, None)
    # direct server return: the third ACK makes the entry; hashed again, it finds its SYN's backend
    third = tcp("10.0.1.2", VIP, 40000, 80, ACK, mp_capable(1, 1, SERVER_KEY, SERVER_KEY))
    assert kernel_model(third, Index.FLOW) == (by_flow | LEARNED | PROVISIONAL, None, False, "copied_capable", True,
                                               None)
    # its next MPTCP packet proves its token: copied once, the flag cleared in conntrack
    proof = tcp("10.0.1.2", VIP, 40000, 80, ACK, dss())
    assert kernel_model(proof, Index.FLOW, ct_mark=by_flow | LEARNED | PROVISIONAL, new=False) == \
        (by_flow | LEARNED | PROVISIONAL, None, False, "copied_proof", False, None)
    assert kernel_model(proof, Index.FLOW, ct_mark=by_flow | LEARNED, new=False).copied is None
    assert kernel_model(third, Index.COUNTER).queued == "queued_first"  # no counter can tell


def test_the_counters_are_read_in_one_dump_of_the_tables_counter_objects():
    request = counters_request("mplb", 9)
    length, kind, flags, seq, _ = NLMSG_HEADER.unpack_from(request)
    assert (length, kind & 0xFF, kind >> 8, flags, seq) == (len(request), NFT_MSG_GETOBJ, 10,
                                                              NLM_F_REQUEST | NLM_F_DUMP, 9)
    # table "mplb\0" (padded), then the object type, counter (1), big endian
    assert request[20:] == bytes([9, 0, 1, 0]) + b"mplb\0" + bytes(3) + bytes([8, 0, 3, 0, 0, 0, 0, 1])
    # an answer as the kernel sends it: nfgenmsg, name, type, data (bytes, packets: big endian u64)
    data = bytes([12, 0, 1, 0]) + (4096).to_bytes(8, "big") + bytes([12, 0, 2, 0]) + (42).to_bytes(8, "big")
    body = bytes(4) + bytes([12, 0, 2, 0]) + b"decided\0" + bytes([8, 0, 3, 0, 0, 0, 0, 1]) + \
        (4 + len(data)).to_bytes(2, "little") + bytes([4, 0x80]) + data
    assert parse_counter(body) == ("decided", 42)
    assert parse_counter(bytes(4) + bytes([12, 0, 2, 0]) + b"decided\0") is None  # no data: not a counter


def test_queue_drops_are_summed_over_every_workers_queue():
    """With workers > 1 each worker reads a queue of its own: the drops of all count."""
    from mplb_nfq.kernel.queue import count_queue_drops

    table = ("   10  1234     3 2 65531 7 1 42 1\n"
             "   11  1235     5 2 65531 2 4 17 1\n"
             "   12  1236     9 2 65531 100 100 9 1\n"
             "garbage\n")
    assert count_queue_drops(table, range(10, 12)) == {"queue_full": 9, "socket_full": 5, "waiting": 8}
    assert count_queue_drops(table, range(10, 11)) == {"queue_full": 7, "socket_full": 1, "waiting": 3}


class AdoptedTable:
    """The kernel as a restarted worker finds it: its own table there, and a transaction that
    brings its rules up to date refused (e.g. a token map of another size)."""

    def __init__(self, tables_refused: bool):
        self.tables_refused, self.ran = tables_refused, []

    def run(self, commands):
        if "# mplb-nfq ruleset" in commands:  # this version's rules, with the tables
            raise KernelError("nft: Could not process rule: File exists")
        return ""  # the VIP sets

    def try_run(self, commands):
        self.ran.append(commands)
        return not self.tables_refused

    def json(self, commands):
        return {}


def test_a_refused_adoption_writes_the_scheduler_tables_alone_or_leaves_them_to_be_written_again():
    """Recorded as written although the transaction failed, the tables stayed stale: a backend
    removed while the worker was down kept getting new connections."""
    from mplb_nfq.kernel.ruleset import Ruleset

    config = cfg(queue_mode="native")
    tables = config.balancer().lookup_tables()
    for refused in (False, True):
        kernel = AdoptedTable(tables_refused=refused)
        ruleset = Ruleset(kernel, config)
        ruleset.outline = lambda: Outline(WORKER_COMMENT, frozenset({"classify"}), {"tokens": "map"})
        ruleset.install(config, tables)
        assert len(kernel.ran) == 1 and "svc_web" in kernel.ran[0]  # the tables, in a transaction of their own
        assert ruleset.tables == ({} if refused else dict(tables))
        assert (ruleset.written_for is None) == refused


def test_a_conntrack_entry_created_reads_back_as_its_flow_mark_and_state():
    from mplb_nfq.kernel.ctnetlink import CREATED, CT_NEW, NLM_F_EXCL, create_message, entry_of
    from mplb_nfq.kernel.nfnetlink import messages

    for flow in [(bytes([10, 0, 0, 1]), 40000, bytes([10, 99, 0, 1]), 80),
                 (ipaddress.ip_address("fd00::1").packed, 1, ipaddress.ip_address("fd99::1").packed, 443)]:
        data = create_message(flow, 0x48000101, 600, seq=7)
        ((kind, flags, seq, body, error),) = messages(data)
        family = struct.unpack_from("=B", body)[0]
        assert (kind, seq, error, family) == (CT_NEW, 7, None, socket.AF_INET if len(flow[0]) == 4 else socket.AF_INET6)
        assert flags & NLM_F_EXCL and flags & NLM_F_REQUEST
        assert entry_of(kind, flags, body) == (flow, 0x48000101, 3, CREATED, False)  # ESTABLISHED


def test_conntrack_events_read_as_created_changed_destroyed_and_other_messages_are_skipped():
    from mplb_nfq.kernel.ctnetlink import (CHANGED, CT_DELETE, CT_GET, CT_NEW, DESTROYED, NLM_F_CREATE, dump_message,
                                           entry_of, flow_request)
    from mplb_nfq.kernel.nfnetlink import messages

    flow = (bytes([10, 0, 0, 1]), 40000, bytes([10, 99, 0, 1]), 80)
    ((kind, _, _, body, _),) = messages(flow_request(CT_DELETE, flow, 1))
    assert kind == CT_DELETE and entry_of(kind, 0, body) == (flow, 0, None, DESTROYED, False)
    ((kind, _, _, body, _),) = messages(flow_request(CT_GET, flow, 2))
    assert entry_of(kind, 0, body) is None  # a request, not an entry
    assert entry_of(CT_NEW, 0, body) == (flow, 0, None, CHANGED, False)
    ((kind, flags, _, body, _),) = messages(dump_message(3))
    assert flags & NLM_F_DUMP == NLM_F_DUMP and entry_of(CT_NEW, NLM_F_CREATE, body) is None  # no flow
    assert entry_of(CT_NEW, 0, body[:4] + b"\x08\x00\x01\x80" + bytes(4)) is None  # a tuple with nothing in it
    ((kind, _, _, body, _),) = messages(flow_request(CT_DELETE, flow, 4))
    tcp = bytes([5, 0, 1, 0, socket.IPPROTO_TCP])  # CTA_PROTO_NUM
    assert tcp in body
    udp = body.replace(tcp, bytes([5, 0, 1, 0, socket.IPPROTO_UDP]))
    assert entry_of(kind, 0, udp) is None  # a UDP entry on the same addresses and ports is not the connection's
    cuts = range(len(body) - 2)  # (the last two bytes are the port's padding)
    assert [entry_of(kind, 0, body[:cut]) for cut in cuts] == [None] * len(cuts)  # cut short: no entry, no raise
    ip, proto = body[8:28], body[28:56]  # the tuple's two nests: in the other order, read by the general walk
    assert ip[2:4] == b"\x01\x80" and proto[2:4] == b"\x02\x80"
    swapped = body[:8] + proto + ip + body[56:]
    assert swapped != body and entry_of(kind, 0, swapped) == (flow, 0, None, DESTROYED, False)


def test_a_conntrack_entry_with_the_closing_label_reads_as_closing_and_other_labels_do_not():
    from mplb_nfq.core.marks import CLOSING_LABEL
    from mplb_nfq.kernel.ctnetlink import CHANGED, CT_NEW, CTA_LABELS, entry_of, flow_request
    from mplb_nfq.kernel.nfnetlink import attribute, messages

    flow = (bytes([10, 0, 0, 1]), 40000, bytes([10, 99, 0, 1]), 80)
    ((_, _, _, body, _),) = messages(flow_request(CT_NEW, flow, 1))

    def labels(*bits: int) -> bytes:  # two unsigned longs, host order, as the kernel sends them
        words = [sum(1 << (b % 64) for b in bits if b // 64 == w) for w in (0, 1)]
        return attribute(CTA_LABELS, struct.pack("=QQ", *words))

    assert entry_of(CT_NEW, 0, body + labels(CLOSING_LABEL)) == (flow, 0, None, CHANGED, True)
    assert entry_of(CT_NEW, 0, body + labels(0, 63, 64, CLOSING_LABEL - 1)).closing is False  # an operator's
    assert entry_of(CT_NEW, 0, body + labels(1, CLOSING_LABEL)).closing is True
    assert entry_of(CT_NEW, 0, body + attribute(CTA_LABELS, bytes(8))).closing is False  # short: not ours


def test_a_chunk_of_tokens_with_the_longest_comments_fits_one_netlink_attribute():
    from mplb_nfq.kernel.tokenmap import TokenMap

    tokens = [(t, 0x101) for t in range(TokenMap.CHUNK)]
    batch = token_batch("mplb", tokens, 600, 1, {t: "x" * 200 for t, _ in tokens})
    assert len(batch) < 65535 + 200


def test_a_scheduler_map_rewrite_is_one_transaction_of_deletes_then_adds_each_within_one_attribute():
    from mplb_nfq.kernel.tokenmap import NFT_MSG_NEWSETELEM, SLOTS_PER_MESSAGE, slot_batch

    changes = [(slot, 0x100 + slot % 3) for slot in range(2 * SLOTS_PER_MESSAGE + 1)]
    batch, count = slot_batch("mplb", {"sched_web": changes}, 40)
    parsed = messages(batch)
    assert count == 6 and [seq for _, _, seq, _ in parsed] == list(range(40, 40 + count + 2))
    kinds = [kind & 0xFF for kind, _, _, _ in parsed[1:-1]]
    assert kinds == [NFT_MSG_DELSETELEM, NFT_MSG_NEWSETELEM] * 3
    added = [element for kind, _, _, body in parsed[1:-1] if kind & 0xFF == NFT_MSG_NEWSETELEM
             for element in parse_elements(body)]
    assert [(int.from_bytes(struct.pack("!I", key), "little"), mark) for key, mark, _, _ in added] == changes
