import pytest

from mplb_nfq.config import ConfigError, from_dict, load

GOOD = {"vip": "10.0.100.1", "ports": [80, 443],
        "backends": [{"name": "b1", "address": "10.0.9.11"}, {"name": "b2", "address": "10.0.9.12"}]}


def with_(**changes):
    data = {**GOOD, **changes}
    return {k: v for k, v in data.items() if v is not None}


def test_good_config_derives_marks_and_tables():
    cfg = from_dict(GOOD)
    assert [(b.name, b.mark, b.table) for b in cfg.backends] == [("b1", 0x100, 100), ("b2", 0x101, 101)]
    assert cfg.ports == (80, 443) and cfg.scheduler == "rr" and cfg.unknown_join == "random"
    assert cfg.balancer().backends[1].address == "10.0.9.12"


@pytest.mark.parametrize("data,key,reason", [
    (with_(vip="10.0.100.300"), "vip", "IPv4 or IPv6 address"),
    (with_(vip=None), "vip", "IPv4 or IPv6 address"),
    (with_(ports=[0]), "ports", "TCP ports"),
    (with_(ports=[80, 80]), "ports", "twice"),
    (with_(scheduler="fastest"), "scheduler", "one of rr, sh"),
    (with_(unknown_join="guess"), "unknown_join", "one of random, drop, reset"),
    (with_(mptcp_aware="yes"), "mptcp_aware", "true or false"),
    (with_(backends=[]), "backends", "at least one"),
    (with_(backends=[{"name": "b1", "address": "10.0.9.11"}, {"name": "b1", "address": "10.0.9.12"}]),
     "backends[1].name", "duplicate backend 'b1'"),
    (with_(backends=[{"name": "b1", "address": "10.0.9.11"}, {"name": "b2", "address": "10.0.9.11"}]),
     "backends[1].address", "duplicate backend address"),
    (with_(backends=[{"name": "b1", "address": "10.0.100.1"}]), "backends[0].address", "cannot be the VIP"),
    (with_(backends=[{"name": "b1", "address": "2001:db8::1"}]), "backends[0].address", "address family"),
    (with_(backends=[{"name": "b 1", "address": "10.0.9.11"}]), "backends[0].name", "letters"),
    (with_(backends=[{"name": "b1", "address": "10.0.9.11", "wieght": 3}]), "backends[0].wieght", "unknown key"),
    (with_(kernel={"queue": 70000}), "kernel.queue", "0 to 65535"),
    (with_(kernel={"queue_mode": "fast"}), "kernel.queue_mode", "auto, native or xtables"),
    (with_(kernel={"mark_base": 0xFFFF}), "kernel.mark_base", "do not fit"),
    (with_(limits={"token_timeout": 0}), "limits.token_timeout", "integer from 1"),
    (with_(colour="blue"), "colour", "unknown key"),
])
def test_bad_config_is_refused_naming_file_key_and_reason(data, key, reason):
    with pytest.raises(ConfigError) as e:
        from_dict(data, "/etc/x.toml")
    assert (e.value.path, e.value.key) == ("/etc/x.toml", key)
    assert reason in e.value.reason and str(e.value).startswith(f"/etc/x.toml: {key}: ")


def test_load_reports_unreadable_and_invalid_toml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("vip = \n")
    with pytest.raises(ConfigError, match="not valid TOML") as e:
        load(bad)
    assert e.value.path == str(bad)
