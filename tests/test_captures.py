"""The parser against real MPTCP captures: dpkt and tcpdump's own reading (.out) are the oracles."""
import re

import dpkt
import pytest
from conftest import CAPTURES

from mplb_nfq.core.packet import Malformed, Segment, parse_ip, token_of_key
from mplb_nfq.inspect import inspect_file, read_packets

PCAPS = sorted(CAPTURES.glob("*.pcap"))
CAPABLE_RE = re.compile(r"^\s*(\d+) .*capable v(\d) flags \[(\w*)\](?: csum)? \{(0x[0-9a-f]+)(?:,(0x[0-9a-f]+))?")
JOIN_RE = re.compile(r"^\s*(\d+) .*join id (\d+) token (0x[0-9a-f]+) nonce (0x[0-9a-f]+)")


def parsed(name: str) -> list:
    return [parse_ip(ip) if ip is not None else None for _, ip in read_packets(str(CAPTURES / name))]


def tcpdump_lines(name: str) -> list[str]:
    return (CAPTURES / name.replace(".pcap", ".out")).read_text().splitlines()


@pytest.mark.parametrize("pcap", PCAPS, ids=lambda p: p.name)
def test_tcp_fields_and_options_agree_with_dpkt(pcap):
    checked = 0
    for (_, ip_bytes), ours in zip(read_packets(str(pcap)), parsed(pcap.name)):
        if not isinstance(ours, Segment):
            continue
        ip = dpkt.ip.IP(ip_bytes) if ip_bytes[0] >> 4 == 4 else dpkt.ip6.IP6(ip_bytes)
        segment = ip.data
        assert (ours.sport, ours.dport, ours.flags) == (segment.sport, segment.dport, segment.flags)
        theirs = [(kind, data) for kind, data in dpkt.tcp.parse_opts(segment.opts)
                  if kind not in (dpkt.tcp.TCP_OPT_NOP, dpkt.tcp.TCP_OPT_EOL)]
        assert [(kind, opt[2:]) for kind, opt in ours.option_list] == theirs
        checked += 1
    assert checked > 0 or pcap.name == "mptcp-dss-oobr.pcap"


@pytest.mark.parametrize("pcap", [p for p in PCAPS if "capable" in p.with_suffix(".out").read_text()],
                         ids=lambda p: p.name)
def test_mp_capable_keys_equal_tcpdumps_reading(pcap):
    packets = parsed(pcap.name)
    seen = 0
    for line in tcpdump_lines(pcap.name):
        m = CAPABLE_RE.match(line)
        if not m:
            continue
        number, version, flags, first, second = m.groups()
        capable = packets[int(number) - 1].capable
        assert capable.version == int(version)
        assert capable.hmac_sha == ("H" in flags) and capable.checksum_required == ("A" in flags)
        assert capable.sender_key == bytes.fromhex(first[2:])
        assert capable.receiver_key == (bytes.fromhex(second[2:]) if second else None)
        seen += 1
    assert seen >= 3


def test_every_join_token_in_v0_capture_is_sha1_of_its_connections_receiver_key():
    lines = tcpdump_lines("mptcp-v0.pcap")
    packets = parsed("mptcp-v0.pcap")
    # the receiver (server) key of each connection, from tcpdump's reading of the third ACK
    server_keys = {}
    for line in lines:
        m = CAPABLE_RE.match(line)
        if m and m.group(5):
            server = re.search(r"> ([\d.]+)\.(\d+):", line).group(1)
            server_keys[server] = bytes.fromhex(m.group(5)[2:])
    joins = [JOIN_RE.match(line) for line in lines if JOIN_RE.match(line)]
    assert joins, "the v0 capture holds MP_JOIN SYNs"
    result = inspect_file(str(CAPTURES / "mptcp-v0.pcap"))
    connections = {c["id"]: c for c in result["connections"]}
    for m in joins:
        number, token = int(m.group(1)), int(m.group(3), 16)
        join = packets[number - 1].join
        assert join.token == token and join.nonce == int(m.group(4), 16) and join.address_id == int(m.group(2))
        assert any(token == token_of_key(key, 0) for key in server_keys.values())
        owner = next(j for j in result["joins"] if j["packet"] == number)["connection"]
        assert connections[owner]["server_token"] == f"0x{token:08x}"
        assert bytes.fromhex(connections[owner]["server_key"][2:]) in server_keys.values()


def test_v1_first_data_packet_repeats_both_keys():
    packets = parsed("mptcp-v1.pcap")
    ack, data = packets[2].capable, packets[3].capable
    assert data.data_len == 8192 and (data.sender_key, data.receiver_key) == (ack.sender_key, ack.receiver_key)


def test_malformed_dss_capture_is_reported_not_raised():
    (result,) = parsed("mptcp-dss-oobr.pcap")
    assert isinstance(result, Malformed) and "DSS" in result.reason
