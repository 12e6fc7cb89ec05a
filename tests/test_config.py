import copy
import shutil
import subprocess
from pathlib import Path

import pytest

from mplb_nfq.core.settings import ConfigError
from mplb_nfq.ops.config import from_dict, load
from mplb_nfq.ops.health import Hysteresis

GOOD = {
    "services": [{"name": "web", "vip": "10.0.100.1", "ports": [80, 443], "scheduler": "maglev",
                  "persistence": 300, "backends": ["b1", "b2"]},
                 {"name": "v6", "vips": ["2001:db8::100"], "ports": [80], "backends": ["b2"]}],
    "backends": [{"name": "b1", "address": "10.0.9.11", "weight": 3},
                 {"name": "b2", "addresses": ["10.0.9.12", "2001:db8::12"]}],
    "health": {"interval": 1, "rise": 3, "fall": 2, "mptcp": True},
    "metrics": {"address": "127.0.0.1:9900"},
}


def changed(path: str, value):
    """GOOD with one key set (a.b.0.c); value None removes it."""
    data = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    if value is None:
        del node[int(last) if last.isdigit() else last]
    elif last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return data


def test_good_config():
    cfg = from_dict(GOOD)
    assert [(b.name, b.mark, b.table, b.weight) for b in cfg.backends] == [
        ("b1", 0x100, 1000, 3), ("b2", 0x101, 1001, 1)]
    web, v6 = cfg.services
    assert web.vips == ("10.0.100.1",) and web.ports == (80, 443) and web.scheduler == "maglev"
    assert web.persistence == 300 and v6.vips == ("2001:db8::100",) and v6.backends == ("b2",)
    assert cfg.health.rise == 3 and cfg.health.mptcp and cfg.metrics_address == "127.0.0.1:9900"
    assert cfg.fallback_table == 999
    services = cfg.build_services()
    assert services[0].backends[1] is services[1].backends[0]  # one backend object per name


@pytest.mark.parametrize("path,value,key,reason", [
    ("services.0.maglev_size", 1_000_003, "services[0].maglev_size", "from 3 to 131071"),
    ("services.0.vip", "10.0.100.300", "services[0].vip", "IPv4 or IPv6 address"),
    ("services.0.vip", "10.0.9.11", "services[0].vip", "real address of backend 'b1'"),
    ("services.0.ports", [0], "services[0].ports", "TCP ports"),
    ("services.0.ports", [80, 80], "services[0].ports", "twice"),
    ("services.1.vips", ["10.0.100.1"], "services[1].ports", "also served by 'web'"),
    ("services.0.scheduler", "fastest", "services[0].scheduler", "one of rr, wrr, lc, sh, maglev"),
    ("services.0.unknown_join", "guess", "services[0].unknown_join", "one of random, drop, reset"),
    ("services.0.mptcp_aware", "yes", "services[0].mptcp_aware", "true or false"),
    ("services.0.backends", ["b1", "b9"], "services[0].backends", "unknown backend 'b9'"),
    ("services.1.backends", ["b1"], "services[1].backends", "no IPv6 address"),
    ("services.0.maglev_size", 1000, "services[0].maglev_size", "prime"),
    ("services.1.name", "web", "services[1].name", "duplicate service 'web'"),
    ("services", [], "services", "at least one"),
    ("backends.1.name", "b1", "backends[1].name", "duplicate backend 'b1'"),
    ("backends.1.addresses", ["10.0.9.11"], "backends[1].address", "duplicate backend address"),
    ("backends.1.addresses", ["10.0.9.12", "10.0.9.13"], "backends[1].addresses", "one address per family"),
    ("backends.0.name", "b 1", "backends[0].name", "letters"),
    ("backends.0.wieght", 3, "backends[0].wieght", "unknown key"),
    ("backends.0.weight", -1, "backends[0].weight", "integer from 0"),
    ("backends.0.mark", 0x101, "backends[1].mark", None),
    ("kernel.queue", 70000, "kernel.queue", "0 to 65535"),
    ("kernel.queue_mode", "fast", "kernel.queue_mode", "one of auto, native, xtables"),
    ("kernel.handshakes", "held", "kernel.handshakes", "one of kernel, queue"),
    ("services.0.joins", "ports", "services[0].joins", "one of token, announced-port"),
    ("services.0.joins", "announced-port", "services[0].join_port_base", "integer from 1"),
    ("services.0.join_port_base", 10000, "services[0].join_port_base", 'only with joins = "announced-port"'),
    ("kernel.mark_base", 0xFFF0, "kernel.max_backends", "overlap the flag bits"),
    ("kernel.table_base", 250, "kernel.table_base", "reserved"),
    ("limits.token_timeout", 0, "limits.token_timeout", "integer from 1"),
    ("health.timeout", 5, "health.timeout", "longer than the interval"),
    ("metrics.address", "localhost", "metrics.address", "HOST:PORT"),
    ("control.socket", "relative.sock", "control.socket", "absolute path"),
    ("colour", "blue", "colour", "unknown key"),
])
def test_bad_config_is_refused_naming_file_key_and_reason(path, value, key, reason):
    data = changed(path, value)
    if path == "backends.0.mark":  # b1 explicitly takes the mark b2 then also claims
        data["backends"][1]["mark"] = 0x101
        reason = "overlaps backend 'b1'"
    with pytest.raises(ConfigError) as e:
        from_dict(data, "/etc/x.toml")
    assert (e.value.path, e.value.key) == ("/etc/x.toml", key), str(e.value)
    assert reason in e.value.reason and str(e.value).startswith(f"/etc/x.toml: {key}: ")


def test_a_backend_in_no_service_is_refused():
    data = changed("services.1.backends", ["b2"])
    data["services"][0]["backends"] = ["b2"]
    with pytest.raises(ConfigError, match="backends\\[0\\].name: backend 'b1' is in no service"):
        from_dict(data)


def test_load_reports_unreadable_and_invalid_toml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("services = \n")
    with pytest.raises(ConfigError, match="not valid TOML") as e:
        load(bad)
    assert e.value.path == str(bad)


def test_example_config_in_deploy_is_valid():
    cfg = load(Path(__file__).parents[1] / "deploy" / "config.example.toml")
    assert cfg.services and cfg.backends


def test_reload_keeps_the_marks_of_running_backends():
    cfg = from_dict(GOOD)
    running = {b.name: b.mark for b in cfg.backends}  # b1 0x100, b2 0x101
    data = changed("backends.0", {"name": "b3", "address": "10.0.9.13"})  # b1 removed, b3 added first
    data["services"][0]["backends"] = ["b3", "b2"]
    new = from_dict(data).with_stable_marks(running)
    marks = {b.name: (b.mark, b.table) for b in new.backends}
    assert marks["b2"] == (0x101, 1001)  # kept, although b2 is now first in the file
    assert marks["b3"][0] not in running.values()


def test_health_hysteresis_rise_and_fall():
    h = Hysteresis(rise=2, fall=3)
    assert [h.record(ok) for ok in (False, False, True, False, False)] == [None, None, None, None, None]
    assert h.record(False) is False and not h.up
    assert h.record(True) is None and h.record(False) is None
    assert h.record(True) is None and h.record(True) is True and h.up


def test_queue_and_workers_past_the_last_queue_number_are_refused_the_last_one_is_fine():
    assert from_dict(changed("kernel", {"queue": 65534, "workers": 2})).queue == 65534
    with pytest.raises(ConfigError, match="pass 65535"):
        from_dict(changed("kernel", {"queue": 65535, "workers": 2}))


def test_running_out_of_marks_is_a_config_error_not_a_crash():
    cfg = from_dict(changed("kernel", {"max_backends": 2}))
    with pytest.raises(ConfigError, match="no free mark for backend 'b2'"):
        cfg.with_stable_marks({"gone1": 0x100, "gone2": 0x101, "b1": 0x100})


def test_join_ports_follow_the_marks_and_may_not_take_a_port_already_served():
    data = changed("services.0.joins", "announced-port")
    data["services"][0]["join_port_base"] = 10000
    cfg = from_dict(data)
    web = cfg.services[0]
    assert cfg.join_ports(web) == {"b1": 10000, "b2": 10001} and cfg.join_ports(cfg.services[1]) == {}
    moved = cfg.with_stable_marks({"b1": 0x105})  # a reload where b1 keeps the mark it had: its port follows
    assert moved.join_ports(moved.services[0])["b1"] == 10005
    data["services"][0]["join_port_base"] = 300  # 300-555: one port per possible backend, 443 among them
    with pytest.raises(ConfigError) as e:
        from_dict(data, "/etc/x.toml")
    assert e.value.key == "services[0].join_port_base" and "port 443, served by 'web'" in e.value.reason


def cluster_config(tmp_path, **cluster):
    password = tmp_path / "redis.password"
    password.write_text("s3cret\n")
    data = {"services": [{"name": "web", "vip": "10.0.100.1", "ports": [80], "scheduler": "maglev",
                          "direct_return": True}],
            "backends": [{"name": "b1", "address": "10.0.9.11"}, {"name": "b2", "address": "10.0.9.12"}],
            "cluster": {"name": "edge", "balancer": "lb1", "redis": "redis://10.0.9.250:6379/0", "username": "mplb",
                        "password_file": str(password), **cluster}}
    return data


def test_a_cluster_reads_its_password_from_a_file_and_never_shows_it(tmp_path):
    cfg = from_dict(cluster_config(tmp_path), "/etc/x.toml")
    assert (cfg.cluster.name, cfg.cluster.balancer, cfg.cluster.username) == ("edge", "lb1", "mplb")
    assert cfg.cluster.password == "s3cret" and "s3cret" not in repr(cfg)
    assert cfg.cluster.announce_device == "mplb-announce"
    assert from_dict(cluster_config(tmp_path, announce_device=""), "x").cluster.announce_device is None
    data = cluster_config(tmp_path)
    del data["cluster"]["username"]
    assert from_dict(data, "x").cluster.username == "lb1"  # each balancer its own Redis user


def test_a_cluster_may_name_a_sentinel_set_whose_primary_the_link_follows(tmp_path):
    from mplb_nfq.core.settings import SentinelSet, sentinel_set

    address = "sentinel://10.0.9.250:26379,[fd00:9::fa]:26380,redis-3.example:26381/mplb/2"
    cfg = from_dict(cluster_config(tmp_path, redis=address), "x")
    assert sentinel_set(cfg.cluster.redis) == SentinelSet(
        (("10.0.9.250", 26379), ("fd00:9::fa", 26380), ("redis-3.example", 26381)), "mplb", 2, False)
    cfg = from_dict(cluster_config(tmp_path, redis="sentinels://h:26379/mplb", tls_ca="/etc/hostname"), "x")
    assert sentinel_set(cfg.cluster.redis).tls and cfg.cluster.tls_ca == "/etc/hostname"
    assert sentinel_set("redis://h:6379/0") is None


def test_every_default_the_reader_gives_is_the_data_models():
    """token_timeout was 7,200 s in the data model and 5 days in the reader."""
    from mplb_nfq.core.settings import Config, HealthConfig

    cfg = from_dict({"services": [{"name": "web", "vip": "10.0.100.1", "ports": [80], "backends": ["b1"]}],
                     "backends": [{"name": "b1", "address": "10.0.9.11"}]}, "x")
    model = Config(path="x", services=cfg.services, backends=cfg.backends)
    assert cfg == model and cfg.health == HealthConfig() and cfg.token_timeout == 5 * 86400


@pytest.mark.parametrize("change, key, reason", [
    ({"redis": "redis://:pw@10.0.9.250:6379"}, "cluster.redis", "no credentials in it"),
    ({"redis": "http://10.0.9.250"}, "cluster.redis", "must be redis://"),
    ({"redis": "sentinel://10.0.9.250:26379"}, "cluster.redis", "sentinel://HOST:PORT[,HOST:PORT...]/SERVICE"),
    ({"redis": "sentinel://10.0.9.250:99999/mplb"}, "cluster.redis", "Sentinel set"),
    ({"redis": "sentinel://u:pw@10.0.9.250:26379/mplb"}, "cluster.redis", "no credentials in it"),
    ({"redis": "sentinel://h:26379/mplb", "tls_ca": "/etc/hostname"}, "cluster.tls_ca", "sentinels:// (TLS)"),
    ({"password_file": "relative"}, "cluster.password_file", "never talks to an open Redis"),
    ({"password_file": "/nonexistent/pw"}, "cluster.password_file", "cannot read"),
    ({"tls_ca": "/etc/hostname"}, "cluster.tls_ca", "only with a rediss://"),
    ({"redis": "rediss://h:6380", "tls_ca": "/nonexistent"}, "cluster.tls_ca", "readable file"),
    ({"redis": "rediss://h:6380", "tls_cert": "/etc/hostname"}, "cluster.tls_key", "both tls_cert and tls_key"),
    ({"announce_device": "a-name-too-long-for-linux"}, "cluster.announce_device", "at most 15"),
    ({"balancer": "lb 1"}, "cluster.balancer", "letters, digits"),
    ({"peers": 3}, "cluster.peers", "unknown key"),
])
def test_a_bad_cluster_table_is_refused_naming_key_and_reason(tmp_path, change, key, reason):
    with pytest.raises(ConfigError) as e:
        from_dict(cluster_config(tmp_path, **change), "/etc/x.toml")
    assert e.value.key == key and reason in e.value.reason, str(e.value)


def test_a_cluster_needs_a_scheduler_every_balancer_computes_alike_direct_return_and_one_worker(tmp_path):
    for service_change, key, reason in ((("scheduler", "rr"), "services[0].scheduler", "maglev, sh"),
                                        (("direct_return", False), "services[0].direct_return", "direct server")):
        data = cluster_config(tmp_path)
        data["services"][0][service_change[0]] = service_change[1]
        with pytest.raises(ConfigError) as e:
            from_dict(data, "x")
        assert e.value.key == key and reason in e.value.reason
    data = cluster_config(tmp_path)
    data["kernel"] = {"workers": 2}  # the first publishes what the others steer
    assert from_dict(data, "x").workers == 2
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        from_dict(cluster_config(tmp_path, password_file=str(empty)), "x")


def test_the_cluster_examples_in_deploy_are_valid(tmp_path):
    from mplb_nfq.lab.ecmp import balancer_bird, router_bird

    deploy = Path(__file__).parents[1] / "deploy" / "cluster"
    password = tmp_path / "pw"
    password.write_text("x\n")
    text = (deploy / "config.toml").read_text().replace("/etc/mplb-nfq/redis.password", str(password))
    (tmp_path / "config.toml").write_text(text)
    cfg = load(tmp_path / "config.toml")
    assert cfg.cluster.balancer == "lb1" and cfg.services[0].direct_return
    if not shutil.which("bird"):
        pytest.skip("Debian's bird2 is needed to parse the BIRD examples (./dev installs it)")
    (tmp_path / "lab-router.conf").write_text(router_bird(["10.0.100.1", "fd00:100::1"]))
    (tmp_path / "lab-balancer.conf").write_text(balancer_bird(1, ["10.0.100.1", "fd00:100::1"]))
    for conf in [deploy / "bird-balancer.conf", deploy / "bird-router.conf", tmp_path / "lab-router.conf",
                 tmp_path / "lab-balancer.conf"]:
        parsed = subprocess.run(["bird", "-p", "-c", str(conf)], capture_output=True, text=True)
        assert parsed.returncode == 0, f"{conf}: {parsed.stderr}"


def test_the_shipped_sysctls_set_what_direct_server_return_needs():
    """The lab's DSR balancer runs with these; an operator's runs with deploy/sysctl.d's."""
    from mplb_nfq.lab.netns import DIRECT_RETURN_SYSCTLS

    text = (Path(__file__).parents[1] / "deploy" / "sysctl.d" / "90-mplb-nfq.conf").read_text()
    shipped = dict(line.replace(" ", "").split("=") for line in text.splitlines() if line and line[0] != "#")
    assert {key: shipped.get(key) for key in DIRECT_RETURN_SYSCTLS} == {
        key: str(value) for key, value in DIRECT_RETURN_SYSCTLS.items()}


def test_a_cluster_refuses_names_its_peers_could_not_read(tmp_path):
    data = cluster_config(tmp_path)
    data["backends"][1]["name"] = "bä"
    with pytest.raises(ConfigError) as e:
        from_dict(data, "x")
    assert e.value.key == "backends[1].name" and "ASCII" in e.value.reason
    with pytest.raises(ConfigError, match="cluster.balancer: must be at most 64 ASCII"):
        from_dict(cluster_config(tmp_path, balancer="l" * 65), "x")
