"""A cluster of balancers in network namespaces, for `lab --balancers N` and the kernel tests:

    client ==(2 links)== router --- switch (bridge) --- lb1..lbN, b1..bM (VIP on lo), store (Redis)

The router runs BIRD and takes each balancer's BGP announcement of the VIP into one ECMP route,
hashed on L4 (fib_multipath_hash_policy=1); each balancer runs BIRD, which announces the VIP while
the worker's announcement device is up. The backends answer the client through the router (direct
server return). Redis lives in a namespace of its own: nothing for the default user, one ACL user
per balancer (lb1..lb8, each with its own password) who may read the cluster's keys and write
only its own, as deploy/cluster/redis-acl.conf sets it up. With redis="sentinel", a primary and a
replica watched by three sentinels (quorum 2, a primary down after 1 s), as deploy/cluster's
Sentinel files set them up; the balancers find the primary through the sentinels. Everything is
a real process, started here and stopped by destroy().
"""
from __future__ import annotations

import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..core.news import Keys
from .netns import (BACKEND_SETUP, CLIENT, LB_CLIENT_SIDE, VIP, VIP6, Topology, backend_address, run, run_batched,
                    until)

ROUTER_ON_SWITCH, ROUTER_ON_SWITCH6 = "10.0.9.1", "fd00:9::1"
STORE = "10.0.9.250"
REDIS_PORT = 6379
REPLICA_PORT = 6380
SENTINEL_PORTS = (26379, 26380, 26381)
SENTINEL_SERVICE = "mplb"
ROUTER_AS, BALANCER_AS = 65000, 65001
ANNOUNCE_DEVICE = "mplb-announce"
MAX_BALANCERS = 8


def redis_user(balancer: str, password: str, cluster: str) -> str:
    """A balancer's ACL user: it reads the cluster's keys and writes only its own (core.news.Keys),
    with the commands the link sends and nothing that reaches beyond keys."""
    own = " ".join(f"~mplb:{cluster}:lb:{balancer}:{kind}" for kind in Keys.KINDS)
    return (f"user {balancer} on >{password} resetkeys %R~mplb:{cluster}:* {own} "
            f"resetchannels -@all +@read +@write +@connection +select -@dangerous")


def sentinel_data_users(passwords: dict[str, str]) -> str:
    """On every data node of a Sentinel set: the user replicas connect as, and the one the
    sentinels watch and reconfigure it as (Redis's documented least rights for each)."""
    return "\n".join([f"user replica on >{passwords['replica']} +psync +replconf +ping",
                      f"user sentinel on >{passwords['sentinel']} allchannels +multi +slaveof +ping +exec "
                      "+subscribe +config|rewrite +role +publish +info +client|setname +client|kill +script|kill"])


def sentinel_id(port: int) -> str:
    """A sentinel's run id (40 hex digits), set in its config so that its peers can be told of it
    rather than find it by hello messages (every 2 s)."""
    return f"{port:040x}"


def sentinel_config(bind: str, port: int, service: str, primary: str, primary_port: int,
                    internal: dict[str, str], balancers: dict[str, str], directory: Path,
                    sentinels: tuple[int, ...] = (), replicas: tuple[int, ...] = ()) -> str:
    """A sentinel watching `service`'s primary: quorum 2 of 3, down after 1 s of silence; the
    balancers' users may only ask it where the primary is; sentinels talk to each other as their
    own user. The lab tells each of the other sentinels and of the replica at once."""
    asking = "-@all +sentinel|masters +sentinel|get-master-addr-by-name +sentinel|replicas +sentinel|slaves " \
             "+sentinel|sentinels +ping +auth +hello +client|setname"
    known = [f"sentinel myid {sentinel_id(port)}"] if sentinels else []
    known += [f"sentinel known-sentinel {service} {bind} {other} {sentinel_id(other)}"
              for other in sentinels if other != port]
    known += [f"sentinel known-replica {service} {primary} {replica}" for replica in replicas]
    return "\n".join([f"bind {bind}", f"port {port}", f"dir {directory}",
                      f"sentinel monitor {service} {primary} {primary_port} 2", *known,
                      f"sentinel down-after-milliseconds {service} 1000", f"sentinel failover-timeout {service} 5000",
                      f"sentinel auth-user {service} sentinel", f"sentinel auth-pass {service} {internal['sentinel']}",
                      "user default off", f"user sentinel on >{internal['sentinel']} +@all",
                      "sentinel sentinel-user sentinel", f"sentinel sentinel-pass {internal['sentinel']}",
                      *(f"user {role} on >{password} {asking}" for role, password in balancers.items())]) + "\n"


def balancer_address(k: int, version: int = 4) -> str:
    """Balancer k's (from 1) address on the switch."""
    return f"10.0.9.{1 + k}" if version == 4 else f"fd00:9::{1 + k:x}"


def _prefixes(vips: list[str], version: int) -> list[str]:
    return [f"{v}/{32 if version == 4 else 128}" for v in vips if (":" in v) == (version == 6)]


def router_bird(vips: list[str]) -> str:
    """The router's BIRD: BGP from any balancer of the switch (a session per family), only the
    VIPs taken, and the kernel route of a VIP with one nexthop per balancer that announces it."""
    config = [f"router id {ROUTER_ON_SWITCH};", "protocol device {}"]
    for version, channel, router, subnet in ((4, "ipv4", ROUTER_ON_SWITCH, "10.0.9.0/24"),
                                             (6, "ipv6", ROUTER_ON_SWITCH6, "fd00:9::/64")):
        accepted = ", ".join(_prefixes(vips, version))
        if not accepted:
            continue
        config.append(f"""protocol kernel {{ {channel} {{ export all; }}; merge paths on; }}
protocol bgp balancers{version} {{
    local {router} as {ROUTER_AS};
    neighbor range {subnet} as {BALANCER_AS};
    dynamic name "lb{version}_";
    hold time 3; keepalive time 1;
    {channel} {{ import filter {{ if net ~ [ {accepted} ] then accept; reject; }}; export none; }};
}}""")
    return "\n".join(config) + "\n"


def balancer_bird(k: int, vips: list[str], device: str = ANNOUNCE_DEVICE) -> str:
    """Balancer k's BIRD: the VIPs announced while `device` (the worker's) is up, a BGP session
    to the router per family."""
    config = [f"router id {balancer_address(k)};", "protocol device {}"]
    for version, channel, router in ((4, "ipv4", ROUTER_ON_SWITCH), (6, "ipv6", ROUTER_ON_SWITCH6)):
        prefixes = _prefixes(vips, version)
        if not prefixes:
            continue
        routes = "\n".join(f'    route {p} via "{device}";' for p in prefixes)
        config.append(f"""protocol static vips{version} {{
    {channel};
    check link on;
{routes}
}}
protocol bgp uplink{version} {{
    local {balancer_address(k, version)} as {BALANCER_AS};
    neighbor {router} as {ROUTER_AS};
    hold time 3; keepalive time 1;
    {channel} {{ import none; export filter {{ if net ~ [ {", ".join(prefixes)} ] then accept; reject; }}; }};
}}""")
    return "\n".join(config) + "\n"


@dataclass
class ClusterTopology(Topology):
    balancers: int = 2
    run_dir: Path = field(default_factory=lambda: Path("/tmp"))
    redis_passwords: dict[str, str] = field(default_factory=lambda: {
        f"lb{k}": secrets.token_hex(16) for k in range(1, MAX_BALANCERS + 1)})
    direct_return: bool = True
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    added: set = field(default_factory=set)  # balancers added after the build
    tls: bool = False  # Redis only over TLS, its certificate from a CA of the run's own
    redis: str = "single"  # or "sentinel": a primary, a replica and three sentinels
    internal_passwords: dict[str, str] = field(default_factory=lambda: {
        user: secrets.token_hex(16) for user in ("replica", "sentinel")})

    @property
    def namespaces(self) -> list[str]:
        return [self.ns(r) for r in ("client", "router", "switch", "store", *self.balancer_names)] + [
            self.ns(f"b{i + 1}") for i in range(self.backends)]

    @property
    def balancer_names(self) -> list[str]:
        return [f"lb{k}" for k in range(1, MAX_BALANCERS + 1) if k <= self.balancers or k in self.added]

    def _build(self) -> None:
        if not 1 <= self.balancers <= MAX_BALANCERS:
            raise ValueError(f"1 to {MAX_BALANCERS} balancers, got {self.balancers}")
        client, router, switch, store = (self.ns(r) for r in ("client", "router", "switch", "store"))
        for n in [client, router, switch, store] + [self.ns(f"b{i + 1}") for i in range(self.backends)]:
            run(["ip", "netns", "add", n])
        cmds = [f"link add c1 netns {client} type veth peer name r1 netns {router}",
                f"link add c2 netns {client} type veth peer name r2 netns {router}",
                f"link add sw netns {router} type veth peer name router netns {switch}",
                f"link add eth0 netns {store} type veth peer name store netns {switch}",
                f"-n {switch} link add br0 type bridge", f"-n {switch} link set br0 up"]
        for port in ["router", "store"] + [f"b{i + 1}" for i in range(self.backends)]:
            if port.startswith("b"):
                cmds.append(f"link add eth0 netns {self.ns(port)} type veth peer name {port} netns {switch}")
            cmds += [f"-n {switch} link set {port} master br0", f"-n {switch} link set {port} up"]
        cmds += [f"-n {client} link set c1 up", f"-n {client} link set c2 up", f"-n {client} link set lo up",
                 f"-n {client} mptcp limits set subflows 4 add_addr_accepted 4",
                 f"-n {router} link set r1 up", f"-n {router} link set r2 up", f"-n {router} link set sw up",
                 f"-n {router} link set lo up", f"-n {store} addr add {STORE}/24 dev eth0",
                 f"-n {store} link set eth0 up", f"-n {store} link set lo up"]
        cmds += [f"-n {self.ns(f'b{i + 1}')} link set {dev} up" for i in range(self.backends) for dev in ("eth0", "lo")]
        for version, prefix in ((4, "/24"), (6, "/64")):
            six = " nodad" if version == 6 else ""  # usable at once
            (c1, c2), (r1, r2) = CLIENT[version], LB_CLIENT_SIDE[version]
            on_switch = ROUTER_ON_SWITCH if version == 4 else ROUTER_ON_SWITCH6
            cmds += [f"-n {client} addr add {c1}{prefix} dev c1{six}", f"-n {client} addr add {c2}{prefix} dev c2{six}",
                     f"-n {client} route add default via {r1} dev c1",
                     f"-n {client} route add default via {r2} dev c2 table 102",
                     f"-n {client} mptcp endpoint add {c2} subflow",
                     f"-n {router} addr add {r1}{prefix} dev r1{six}", f"-n {router} addr add {r2}{prefix} dev r2{six}",
                     f"-n {router} addr add {on_switch}{prefix} dev sw{six}"]
            for i in range(self.backends):
                b = self.ns(f"b{i + 1}")
                cmds += [f"-n {b} addr add {backend_address(i, version)}{prefix} dev eth0{six}",
                         f"-n {b} route add default via {on_switch}"]
        run_batched(cmds)
        for version in (4, 6):  # `ip rule` takes its family from -4/-6 only, which a batch cannot set
            run(["ip", f"-{version}", "-n", client, "rule", "add", "from", CLIENT[version][1], "table", "102",
                 "priority", "100"])
        for n in (client, router):
            self.sysctl(n, "net.ipv4.conf.all.rp_filter", 0)
            self.sysctl(n, "net.ipv4.conf.default.rp_filter", 0)
        for key, value in (("net.ipv4.ip_forward", 1), ("net.ipv4.fib_multipath_hash_policy", 1),
                           ("net.ipv6.conf.all.forwarding", 1), ("net.ipv6.fib_multipath_hash_policy", 1)):
            self.sysctl(router, key, value)
        self.sysctl(client, "net.mptcp.enabled", 1)
        for i in range(self.backends):
            run(["ip", "netns", "exec", self.ns(f"b{i + 1}"), "sh", str(BACKEND_SETUP), VIP, VIP6],
                capture_output=True)
        if self.rate_mbit:
            for ns, dev in [(router, "r1"), (router, "r2"), (client, "c1"), (client, "c2")]:
                run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                     "rate", f"{self.rate_mbit}mbit", "burst", "64kb", "latency", "50ms"])
        self.start_redis()
        self._start_bird("router", router_bird([VIP, VIP6]))
        for k in range(1, self.balancers + 1):
            self._add_balancer_namespace(k)

    def _add_balancer_namespace(self, k: int) -> None:
        lb, switch = self.ns(f"lb{k}"), self.ns("switch")
        run(["ip", "netns", "add", lb])
        run_batched([f"link add s0 netns {lb} type veth peer name lb{k} netns {switch}",
                     f"-n {switch} link set lb{k} master br0", f"-n {switch} link set lb{k} up",
                     f"-n {lb} addr add {balancer_address(k)}/24 dev s0",
                     f"-n {lb} addr add {balancer_address(k, 6)}/64 dev s0 nodad", f"-n {lb} link set s0 up",
                     f"-n {lb} link set lo up", f"-n {lb} route add default via {ROUTER_ON_SWITCH}",
                     f"-n {lb} route add default via {ROUTER_ON_SWITCH6}"])
        for key, value in (("net.ipv4.ip_forward", 1), ("net.ipv6.conf.all.forwarding", 1),
                           ("net.ipv4.conf.all.rp_filter", 0),
                           ("net.ipv4.conf.default.rp_filter", 0), ("net.ipv4.conf.all.send_redirects", 0),
                           ("net.ipv4.conf.s0.send_redirects", 0), ("net.mptcp.enabled", 1),
                           # direct server return, as deploy/sysctl.d/ says: one direction of each flow
                           ("net.netfilter.nf_conntrack_tcp_loose", 1),
                           ("net.netfilter.nf_conntrack_tcp_timeout_max_retrans", 86400),
                           ("net.netfilter.nf_conntrack_tcp_timeout_unacknowledged", 86400)):
            self.sysctl(lb, key, value)
        self.start_bird(f"lb{k}")

    def add_balancer(self) -> str:
        """One more balancer on the switch, its BIRD running (it announces once its worker runs)."""
        k = len(self.balancer_names) + 1
        self.added.add(k)
        self._add_balancer_namespace(k)
        return f"lb{k}"

    def _start_bird(self, role: str, config: str) -> None:
        conf = self.run_dir / f"bird-{role}.conf"
        conf.write_text(config)
        self.processes[f"bird-{role}"] = self.popen(
            role, "bird", "-f", "-c", str(conf), "-s", str(self.run_dir / f"bird-{role}.ctl"),
            "-P", str(self.run_dir / f"bird-{role}.pid"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start_bird(self, role: str) -> None:
        """Balancer `role`'s BIRD, which announces its VIPs while its worker holds the device."""
        self._start_bird(role, balancer_bird(int(role.removeprefix("lb")), [VIP, VIP6]))

    def stop_bird(self, role: str) -> None:
        """The router withdraws the balancer at once (BIRD closes its BGP session on the way out)."""
        self._stop(f"bird-{role}")

    def redis_config(self, port: int = REDIS_PORT, replica_of: int | None = None) -> str:
        listen = [f"port {port}"]
        if self.tls:
            ca, cert, key = make_certificates(self.run_dir)
            listen = ["port 0", f"tls-port {port}", f"tls-cert-file {cert}", f"tls-key-file {key}",
                      f"tls-ca-cert-file {ca}", "tls-auth-clients no"]
        replication = [f"replicaof {STORE} {replica_of}"] if replica_of else []
        if self.redis == "sentinel":  # any node may be the primary after a failover
            replication += ["masteruser replica", f"masterauth {self.internal_passwords['replica']}",
                            "repl-diskless-sync-delay 0",  # (5 s by default: a replica back would wait)
                            sentinel_data_users(self.internal_passwords)]
        return "\n".join([f"bind {STORE}", *listen, 'save ""', "appendonly no", "protected-mode yes",
                          f"dir {self.run_dir}", "user default off", *replication,
                          *(redis_user(role, password, "*") for role, password in self.redis_passwords.items())]) + "\n"

    def sentinel_config(self, port: int) -> str:
        return sentinel_config(STORE, port, SENTINEL_SERVICE, STORE, REDIS_PORT, self.internal_passwords,
                               self.redis_passwords, self.run_dir, SENTINEL_PORTS, (REPLICA_PORT,))

    def _cli(self, port: int, user: str, password: str) -> list[str]:
        tls = ["--tls", "--cacert", str(self.run_dir / "ca.pem")] if self.tls else []
        return ["redis-cli", "-h", STORE, "-p", str(port), *tls, "--user", user, "--pass", password, "--no-auth-warning"]

    def _asked(self, port: int, *command: str, user: str = "lb1") -> str:
        """A node's or a sentinel's answer (lb1's user, or the sentinels' own for a data node's INFO)."""
        password = self.internal_passwords[user] if user == "sentinel" else self.redis_passwords[user]
        return self.exec("store", *self._cli(port, user, password), *command, capture_output=True, check=False).stdout

    def redis_cli(self, user: str = "lb1", port: int | None = None) -> list[str]:
        """redis-cli as a balancer's user, to the primary (the sentinels say which it is)."""
        return self._cli(port or self.primary_port(), user, self.redis_passwords[user])

    def primary_port(self) -> int:
        if self.redis != "sentinel":
            return REDIS_PORT
        for port in SENTINEL_PORTS:
            answer = self._asked(port, "sentinel", "get-master-addr-by-name", SENTINEL_SERVICE).split()
            if len(answer) == 2:
                return int(answer[1])
        raise RuntimeError("no sentinel names a primary")

    def _start_node(self, name: str, conf_text: str, *args: str) -> None:
        conf = self.run_dir / f"{name}.conf"
        conf.write_text(conf_text)
        conf.chmod(0o600)
        self.processes[name] = self.popen("store", "redis-server", str(conf), *args, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)

    def _pings(self, port: int) -> bool:
        return self._asked(port, "ping").strip() == "PONG"

    def start_redis(self) -> None:
        if self.redis == "single":
            self._start_node("redis", self.redis_config())
            until(lambda: self._pings(REDIS_PORT), 15, "redis-server did not start")
            return
        if self.tls:
            raise ValueError("the lab runs Sentinel without TLS")
        self._start_node(f"redis-{REDIS_PORT}", self.redis_config(REDIS_PORT))
        self._start_node(f"redis-{REPLICA_PORT}", self.redis_config(REPLICA_PORT, replica_of=REDIS_PORT))
        until(lambda: self._pings(REDIS_PORT) and self._pings(REPLICA_PORT), 15, "redis-server did not start")
        for port in SENTINEL_PORTS:
            self._start_node(f"sentinel-{port}", self.sentinel_config(port), "--sentinel")
        until(self._sentinels_ready, 15, "redis-sentinel did not start")

    def _sentinels_ready(self) -> bool:
        """Each sentinel knows the primary, its replica and the two other sentinels."""
        for port in SENTINEL_PORTS:
            asked = self._asked(port, "sentinel", "masters").split()
            fields = dict(zip(asked[::2], asked[1::2]))
            if fields.get("num-slaves") != "1" or fields.get("num-other-sentinels") != "2":
                return False
        return True

    def kill_redis_primary(self) -> int:
        """SIGKILL the primary, as a crash would; its port. The sentinels promote the replica."""
        port = self.primary_port()
        process = self.processes.pop(f"redis-{port}")
        process.kill()
        process.wait()
        return port

    def restart_redis_node(self, port: int) -> None:
        """A node killed earlier, back as a replica of the primary now (started as a primary, it
        would take writes, empty, until the sentinels turned it), once it follows it."""
        self._start_node(f"redis-{port}", self.redis_config(port, replica_of=self.primary_port()))
        until(lambda: "master_link_status:up" in self._asked(port, "info", "replication", user="sentinel"), 15,
              "a replica's link to its primary did not come up")

    def stop_redis(self) -> None:
        for name in [n for n in self.processes if n == "redis" or n.startswith(("redis-", "sentinel-"))]:
            self._stop(name)

    def _stop(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def password_file(self, role: str) -> Path:
        path = self.run_dir / f"redis-{role}.password"
        path.write_text(self.redis_passwords[role] + "\n")
        path.chmod(0o600)
        return path

    def cluster_config(self, role: str, name: str) -> str:
        """The [cluster] table of balancer `role`'s config."""
        scheme, ca = ("rediss", [f'tls_ca = "{self.run_dir / "ca.pem"}"']) if self.tls else ("redis", [])
        address = f"{scheme}://{STORE}:{REDIS_PORT}/0" if self.redis == "single" else \
            "sentinel://" + ",".join(f"{STORE}:{port}" for port in SENTINEL_PORTS) + f"/{SENTINEL_SERVICE}/0"
        return "\n".join(["[cluster]", f'name = "{name}"', f'balancer = "{role}"',
                          f'redis = "{address}"', *ca, f'username = "{role}"',
                          f'password_file = "{self.password_file(role)}"', f'announce_device = "{ANNOUNCE_DEVICE}"']) + "\n"

    def wait_announced(self, count: int, timeout: float = 30.0) -> None:
        """Until the router's routes to both VIPs go through `count` balancers."""
        deadline = time.monotonic() + timeout
        while len(self.nexthops()) != count or len(self.nexthops(6)) != count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the router has {self.nexthops()} for {VIP} and {self.nexthops(6)} for {VIP6}, "
                                   f"not {count} balancers")
            time.sleep(0.1)

    def nexthops(self, version: int = 4) -> list[str]:
        """The balancers the router's route to the VIP (VIP6) goes through now."""
        vip = f"{VIP}/32" if version == 4 else f"{VIP6}/128"
        out = self.exec("router", "ip", f"-{version}", "route", "show", vip, capture_output=True).stdout
        return sorted(set(word for line in out.splitlines() for i, word in enumerate(line.split())
                          if i and line.split()[i - 1] == "via"))

    def destroy(self) -> None:
        for name in list(self.processes):
            self._stop(name)
        super().destroy()


def make_certificates(run_dir: Path, address: str = STORE) -> tuple[Path, Path, Path]:
    """A CA of the run's own and Redis's certificate (for `address`), signed by it: ca.pem,
    redis.pem, redis.key in run_dir."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

    def certificate(subject: str, key, issuer: str, signer, ca: bool, address: str | None = None):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(valid[0]).not_valid_after(valid[1])
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if address:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(address))]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("mplb-nfq lab CA", ca_key, "mplb-nfq lab CA", ca_key, True)
    server = certificate(address, key, "mplb-nfq lab CA", ca_key, False, address)
    paths = run_dir / "ca.pem", run_dir / "redis.pem", run_dir / "redis.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[2].chmod(0o600)
    return paths
