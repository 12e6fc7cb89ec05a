import json

import dpkt
import pytest
from conftest import CAPTURES

from mplb_nfq.cli import main
from mplb_nfq.inspect import inspect_file, inspect_packets, ip_payload, read_packets

CONFIG = """[[services]]
name = "ssh"
vips = ["10.1.1.2", "10.1.2.2"]
ports = [22]
[[backends]]
name = "b1"
address = "10.9.0.1"
[[backends]]
name = "b2"
address = "10.9.0.2"
"""


def test_inspect_json_lists_connection_keys_tokens_and_join(capsys):
    assert main(["inspect", str(CAPTURES / "mptcp-v0.pcap"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    (conn,) = result["connections"]
    assert conn["version"] == 0 and conn["server_key"] == "0x967d2770b6960552"
    assert conn["server_token"] == "0xe47f0142" and conn["client"] == "10.2.1.2:35961"
    (join,) = result["joins"]
    assert join["token"] == "0xe47f0142" and join["connection"] == conn["id"] and join["from"] == "10.2.1.2:41221"


def test_inspect_with_config_shows_the_backend_of_the_connection_and_of_its_join(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG)
    assert main(["inspect", str(CAPTURES / "mptcp-v0.pcap"), "-c", str(cfg)]) == 0
    text = capsys.readouterr().out
    assert "backend b1" in text and "connection #1, backend b1 (join_hit)" in text


def test_inspect_reports_unknown_tokens_and_malformed_packets(capsys):
    assert main(["inspect", str(CAPTURES / "mptcp-dss-oobr.pcap")]) == 0
    assert "malformed packet 1: DSS length 3" in capsys.readouterr().out
    join_only = [(ts, ip) for ts, ip in read_packets(str(CAPTURES / "mptcp-v0.pcap")) if ip and b"\x1e\x0c\x10" in ip]
    assert len(join_only) == 1
    assert inspect_packets(join_only)["joins"][0]["connection"] == "unknown token"


def test_all_three_link_types_of_the_captures():
    # Ethernet (v0), Linux cooked (v1), raw IP (tcprst)
    assert inspect_file(str(CAPTURES / "mptcp-v1.pcap"))["connections"][0]["server_key"] == "0x29a6c86981ad933c"
    assert inspect_file(str(CAPTURES / "mptcp-tcprst.pcap"))["counts"]["tcp"] == 2
    assert inspect_file(str(CAPTURES / "mptcp-v0.pcap"))["counts"]["tcp"] == 264
    assert ip_payload(1, bytes(12) + b"\x08\x06" + bytes(28)) is None  # ARP


def test_pcapng_reads_the_same(tmp_path):
    out = tmp_path / "v0.pcapng"
    with open(CAPTURES / "mptcp-v0.pcap", "rb") as src, open(out, "wb") as dst:
        writer = dpkt.pcapng.Writer(dst, linktype=dpkt.pcap.DLT_EN10MB)
        for ts, frame in dpkt.pcap.Reader(src):
            writer.writepkt(frame, ts=ts)
    ng, classic = inspect_file(str(out)), inspect_file(str(CAPTURES / "mptcp-v0.pcap"))
    assert ng["connections"] == classic["connections"] and ng["joins"] == classic["joins"]


@pytest.mark.parametrize("content", [b"", b"garbage, not a capture at all", b"\xd4\xc3\xb2\xa1" + bytes(10)])
def test_an_empty_or_garbage_file_gets_a_clear_error_not_a_traceback(tmp_path, capsys, content):
    path = tmp_path / "bad.pcap"
    path.write_bytes(content)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"mplb-nfq inspect: {path}: not a readable pcap or pcapng file" in err and "Traceback" not in err
