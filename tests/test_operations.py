"""Operating the balancer on the real kernel: status, MPTCP-aware drain, live reload, health failover."""
import json
import os
import signal
import stat
import sys
import time

from conftest import start_server
from netlab import (
    KERNEL,
    MB,
    NO_WRONG_JOINS,
    counters,
    delta,
    fetch,
    fetch_in_background,
    forget_connections,
    one_path_download,
    serving,
    wait_for,
    wrong_joins,
)

from mplb_nfq.lab.lab import MODES, PORT
from mplb_nfq.lab.netns import VIP, backend_address

pytestmark = KERNEL
FAST = "conntrack_interval = 0.3\n"


def cli(topo, *args, check=True):
    return topo.exec("lb", sys.executable, "-m", "mplb_nfq", *args, capture_output=True, check=check)


def status(topo, w):
    return json.loads(cli(topo, "status", "--json", "-c", str(w.config_path)).stdout)


def states(topo, w):
    found = {b["name"]: b for s in status(topo, w)["services"] for b in s["backends"]}
    found.update({b["name"]: b for b in status(topo, w)["retired"]})
    return found


def config(run_dir, backends, extra="[kernel]\n" + FAST):
    lines = ["[[services]]", 'name = "lab"', f'vip = "{VIP}"', f"ports = [{PORT}]", MODES["mplb"],
             f"backends = {json.dumps(backends)}",
             f'[control]\nsocket = "{run_dir / "control.sock"}"', '[metrics]\naddress = ""',
             "[health]\ninterval = 0.5\ntimeout = 0.4\nrise = 2\nfall = 2", extra]
    for name in backends:
        lines.append(f'[[backends]]\nname = "{name}"\naddress = "{backend_address(int(name[1:]) - 1)}"')
    return "\n".join(lines) + "\n"


def test_status_shows_services_backends_and_live_counts(topo, worker):
    w = worker("mplb", kernel=FAST)
    sock = status(topo, w)
    assert sock["queue_mode"] in ("native nft queue", "xtables NFQUEUE on mark bit")
    path = [line for line in w.config_path.read_text().splitlines() if line.startswith("socket")][0].split('"')[1]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # only root opens the control socket
    forget_connections(topo)  # the counts below are this download's: no earlier module's closing entry among them
    before = counters(topo)
    download = fetch_in_background(topo, 40 * MB)
    time.sleep(0.5)
    home = serving(before, counters(topo))

    def home_line():
        text = cli(topo, "status", "-c", str(w.config_path)).stdout
        assert f"TCP  {VIP}:{PORT}" in text and " rr " in text
        return next(ln for ln in text.splitlines() if ln.strip().startswith(f"-> {home}")).split()

    seen = []
    try:
        wait_for(lambda: seen.append(home_line()) or seen[-1][-3:] == ["1", "1", "1"], 5)  # weight, conns, subflows
    except AssertionError:
        raise AssertionError(f"{home}'s status line stayed {seen[-1]}") from None
    assert "up" in home_line()
    assert json.loads(download.communicate(timeout=60)[0])["received"] == 40 * MB
    assert status(topo, w)["tokens_tracked"] >= 1
    # closed: counted out at its first FIN, while its entries wait out TIME_WAIT
    try:
        wait_for(lambda: seen.append(home_line()) or seen[-1][-2:] == ["0", "0"], 5)
    except AssertionError:
        raise AssertionError(f"{home}'s status line stayed {seen[-1]} after the download ended") from None


def test_drained_backend_takes_no_new_connection_but_new_subflows_of_its_own(topo, worker):
    w = worker("mplb", kernel=FAST)
    with one_path_download(topo, 30 * MB) as download:
        home = download.home
        assert cli(topo, "drain", home, "-c", str(w.config_path)).stdout.strip() == f"{home}: draining"
        assert [r["received"] for r in fetch(topo, MB, MB, MB)] == [MB] * 3
        after_new = counters(topo)
        assert delta(download.running, after_new, "MPTcpExtMPCapableSYNRX")[home] == 0  # new ones went elsewhere
        time.sleep(1.0)  # the short connections are gone: the client must not add subflows to them, dying
        topo.subflow_endpoint(True)  # the client now adds a subflow to the open connection
        assert json.loads(download.process.communicate(timeout=60)[0])["received"] == 30 * MB
        end = counters(topo)
        assert delta(after_new, end, "MPTcpExtMPJoinAckRx")[home] == 1  # it reached the drained backend
        assert wrong_joins(download.before, end) == NO_WRONG_JOINS
        assert states(topo, w)[home]["state"] == "draining"
        assert cli(topo, "undrain", home, "-c", str(w.config_path)).stdout.strip() == f"{home}: up"
        again = counters(topo)
        fetch(topo, MB, MB)
        assert delta(again, counters(topo), "MPTcpExtMPCapableSYNRX")[home] >= 1


def test_a_drain_rewrites_only_a_maglev_tables_virtual_backends_and_the_kernel_holds_the_cores_table(
        topo, worker, tmp_path):
    """A backend's state change writes only its virtual backends' entries, over nfnetlink, in
    one transaction: the slots and the service's chain stay as they are (its rules keep their
    handles)."""
    maglev = 'scheduler = "maglev"\nmaglev_size = 251\nmptcp_aware = true\n'
    w = worker("mplb", text=config(tmp_path, ["b1", "b2"]).replace(MODES["mplb"], maglev))

    def elements(name):
        listing = json.loads(topo.exec("lb", "nft", "-j", "list", "map", "inet", "mplb", name,
                                       capture_output=True).stdout)
        (found,) = [item["map"].get("elem", []) for item in listing["nftables"] if "map" in item]
        return {key: value for key, value in found}

    def rule_handles():
        return topo.exec("lb", "nft", "-a", "list", "chain", "inet", "mplb", "svc_lab", capture_output=True).stdout

    marks = {name: int(b["mark"], 16) for name, b in states(topo, w).items()}
    slots, via, rules = elements("sched_lab"), elements("via_lab"), rule_handles()
    assert len(slots) == 251 and set(slots.values()) <= set(via) and set(via.values()) == {marks["b1"], marks["b2"]}
    assert cli(topo, "drain", "b1", "-c", str(w.config_path)).stdout.strip() == "b1: draining"
    wait_for(lambda: set(elements("via_lab").values()) == {marks["b2"]}, 5)
    assert elements("sched_lab") == slots and rule_handles() == rules
    cli(topo, "undrain", "b1", "-c", str(w.config_path))
    wait_for(lambda: elements("via_lab") == via, 5)  # each virtual backend back on its own backend
    assert elements("sched_lab") == slots and rule_handles() == rules


def test_reload_adds_and_removes_backends_during_a_live_transfer(topo, worker, tmp_path):
    w = worker("mplb", text=config(tmp_path, ["b1"]))
    with one_path_download(topo, 40 * MB) as download:
        assert download.home == "b1"

        w.config_path.write_text(config(tmp_path, ["b1", "b2"]))
        assert "2 backends" in cli(topo, "reload", "-c", str(w.config_path)).stdout
        added = counters(topo)
        fetch(topo, MB, MB, MB, MB)
        assert all(n >= 1 for n in delta(added, counters(topo), "MPTcpExtMPCapableSYNRX").values())

        w.config_path.write_text(config(tmp_path, ["b2"]))
        assert "retired (draining until their connections end): b1" in cli(
            topo, "reload", "-c", str(w.config_path)).stdout
        removed = counters(topo)
        fetch(topo, MB, MB, MB)
        assert delta(removed, counters(topo), "MPTcpExtMPCapableSYNRX") == {"b1": 0, "b2": 3}

        good = w.config_path.read_text()
        w.config_path.write_text(good.replace('ports = [', 'ports = [0, '))
        refused = cli(topo, "reload", "-c", str(w.config_path), check=False)
        assert refused.returncode != 0 and f"{w.config_path}: services[0].ports" in refused.stderr
        w.config_path.write_text(good.replace("conntrack_interval", "queue = 7\nconntrack_interval"))
        w.proc.send_signal(signal.SIGHUP)  # valid, but the queue cannot change on the fly: refused
        wait_for(lambda: "queue: cannot change on reload" in w.log_path.read_text(), 5)
        assert states(topo, w)["b2"]["state"] == "up" and "b1" in states(topo, w)  # the running config stays
        w.config_path.write_text(good)

        time.sleep(1.0)  # the short connections are gone: the client must not add subflows to them, dying
        topo.subflow_endpoint(True)  # a new subflow of the transfer still on the removed backend
        assert json.loads(download.process.communicate(timeout=60)[0])["received"] == 40 * MB
        end = counters(topo)
        assert delta(removed, end, "MPTcpExtMPJoinAckRx")["b1"] == 1
        assert wrong_joins(download.before, end) == NO_WRONG_JOINS
        # once its connections are gone, the retired backend and its routes go too
        wait_for(lambda: "b1" not in states(topo, w), 10, step=0.3)
        assert topo.exec("lb", "ip", "route", "show", "table", "1000", capture_output=True).stdout.strip() == ""


def test_health_failover_and_recovery(topo, worker):
    w = worker("mplb")  # health: interval 0.5 s, timeout 0.4 s, rise 2, fall 2
    assert states(topo, w)["b1"]["state"] == "up"
    killed = time.monotonic()
    topo.servers["b1"].kill()
    topo.servers["b1"].wait()
    try:
        down_at = wait_for(lambda: states(topo, w)["b1"]["state"] == "down", 5)
        assert down_at - killed <= 2 * 0.5 + 0.4 + 1.0  # fall x interval (+ timeout, + scheduling slack)
        before = counters(topo)
        assert [r["received"] for r in fetch(topo, MB, MB, MB, MB)] == [MB] * 4
        assert delta(before, counters(topo), "MPTcpExtMPCapableSYNRX") == {"b1": 0, "b2": 4}
    finally:
        start_server(topo, "b1")
    restarted = time.monotonic()
    up_at = wait_for(lambda: states(topo, w)["b1"]["state"] == "up", 5)
    assert up_at - restarted <= 2 * 0.5 + 1.0
    before = counters(topo)
    fetch(topo, MB, MB)
    assert delta(before, counters(topo), "MPTcpExtMPCapableSYNRX") == {"b1": 1, "b2": 1}


def test_mptcp_health_check_tells_a_fallback_from_mptcp(topo):
    plain = topo.popen("b2", sys.executable, "-c", "import socket, time; s = socket.socket(); "
                       "s.bind(('0.0.0.0', 9999)); s.listen(); time.sleep(30)")
    try:
        time.sleep(0.5)
        probe = "from mplb_nfq.ops.health import probe; import sys; print(probe(sys.argv[1], int(sys.argv[2]), 1, True))"
        ok = topo.exec("lb", sys.executable, "-c", probe, backend_address(0), str(PORT), capture_output=True)
        assert ok.stdout.strip() == "None"
        fallback = topo.exec("lb", sys.executable, "-c", probe, backend_address(1), "9999", capture_output=True)
        assert "fell back to TCP" in fallback.stdout
    finally:
        plain.kill()
        plain.wait()


def test_persistence_in_the_kernel_keeps_a_client_on_its_backend_until_that_one_is_drained(topo, worker, tmp_path):
    """The kernel remembers each client's backend (a set of clients per backend, whose entries
    time out); a drained backend's clients are forgotten, and remembered on the backend they get
    next."""
    w = worker("mplb", text=config(tmp_path, ["b1", "b2"]).replace(MODES["mplb"], MODES["mplb"] + "persistence = 60\n"))
    homes = []
    for _ in range(3):
        before = counters(topo)
        assert [r["received"] for r in fetch(topo, 64 * 1024)] == [64 * 1024]
        homes.append(serving(before, counters(topo)))
    (home,) = set(homes)  # round robin alone would have alternated
    other = next(name for name in topo.backend_names if name != home)
    try:
        cli(topo, "drain", home, "-c", str(w.config_path))
        time.sleep(0.5)
        for _ in range(2):
            before = counters(topo)
            fetch(topo, 64 * 1024)
            assert serving(before, counters(topo)) == other
        cli(topo, "undrain", home, "-c", str(w.config_path))
        time.sleep(0.5)
        before = counters(topo)
        fetch(topo, 64 * 1024)
        assert serving(before, counters(topo)) == other  # remembered where it went while home was drained
    finally:
        cli(topo, "undrain", home, "-c", str(w.config_path), check=False)
    for name, expected in ((home, False), (other, True)):
        mark = int(states(topo, w)[name]["mark"], 16)
        listing = topo.exec("lb", "nft", "list", "set", "inet", "mplb", f"affinity4_{mark:x}_lab",
                            capture_output=True).stdout
        assert ("10.0.1.2" in listing) is expected, (name, listing)
