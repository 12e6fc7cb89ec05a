"""mplb-nfq: the command line."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .core.settings import ConfigError
from .ops.config import load

DEFAULT_CONFIG = "/etc/mplb-nfq/config.toml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mplb-nfq", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="install the data path and run the queue worker in the foreground")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG)

    p = sub.add_parser("status", help="services, backends, tokens and queue of the running worker")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="to find the control socket")
    p.add_argument("--json", action="store_true")

    for name, text in (("drain", "no new connections to BACKEND; its connections keep their subflows"),
                       ("undrain", "BACKEND takes new connections again")):
        p = sub.add_parser(name, help=text)
        p.add_argument("backend")
        p.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="to find the control socket")

    p = sub.add_parser("reload", help="re-read the config in the running worker (as SIGHUP does)")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG)

    p = sub.add_parser("cleanup", help="remove every kernel object of a config (after a crashed worker)")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG)

    p = sub.add_parser("check", help="what this kernel supports; with -c, validate a config too")
    p.add_argument("-c", "--config")
    p.add_argument("--json", action="store_true")
    p.add_argument("--backend", action="store_true", help='on a backend: is it set up for joins = "announced-port"')

    p = sub.add_parser("render-nft", help="print the nftables ruleset for a config (loads with nft -f)")
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    p.add_argument("--queue-mode", choices=("native", "xtables"),
                   help="default: the config's, probed on this kernel when it says auto")

    p = sub.add_parser("inspect", help="MPTCP connections, tokens and joins in a pcap/pcapng file")
    p.add_argument("pcap")
    p.add_argument("-c", "--config", help="also show which backend the balancer would choose")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("lab", help="the paper's experiment in network namespaces")
    p.add_argument("--quick", action="store_true", help="a smaller run (for tests)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON document")
    p.add_argument("--sizes", help="file sizes in MB, comma-separated")
    p.add_argument("--repeat", type=int, help="downloads per size and mode")
    p.add_argument("--out", default="lab-results", help="directory for results.json and the plot")
    p.add_argument("--family", choices=("4", "6", "dual"), default="4",
                   help="IPv4, IPv6, or dual stack (an IPv4 connection, its second subflow over IPv6)")
    p.add_argument("--dsr", action="store_true", help="direct server return: answers bypass the LB")
    p.add_argument("--joins", choices=("token", "announced-port"), default="token",
                   help="announced-port: the backends announce a join port of their own (C flag)")
    p.add_argument("--tunnel", choices=("vxlan", "ipip"), help="backends behind a router, through tunnels (IPv4)")
    p.add_argument("--balancers", type=int, default=0,
                   help="a cluster of N balancers behind a router (BGP, ECMP), sharing tokens through Redis")
    p.add_argument("--redis", choices=("single", "sentinel"), default="single",
                   help="a cluster's Redis: one process, or a primary and a replica under three sentinels")
    p.add_argument("--faults", action="store_true",
                   help="a cluster's MPLB run: kill the Redis primary and a balancer, flap a backend, mid-transfer")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"mplb-nfq: invalid config: {e}", file=sys.stderr)
        return 2


def cmd_run(args) -> int:
    from .kernel.conntrack import FollowerLost
    from .ops.instance import AlreadyRunning
    from .service import run

    try:
        return run(load(args.config))
    except (AlreadyRunning, FollowerLost) as e:
        print(f"mplb-nfq: {e}", file=sys.stderr)
        return 1


def _control(args, command: str, **request) -> dict | None:
    from .ops.control import request as send

    path = load(args.config).control_socket
    try:
        answer = send(path, command, **request)
    except OSError as e:
        print(f"mplb-nfq: no worker answers on {path}: {e.strerror or e}", file=sys.stderr)
        return None
    if not answer.get("ok"):
        print(f"mplb-nfq: {command}: {answer.get('error')}", file=sys.stderr)
        return None
    return answer


def cmd_status(args) -> int:
    from .ops.status import render_status

    answer = _control(args, "status")
    if answer is None:
        return 1
    print(json.dumps(answer, indent=2) if args.json else render_status(answer))
    return 0


def cmd_drain(args) -> int:
    answer = _control(args, args.command, backend=args.backend)
    if answer is None:
        return 1
    print(f"{answer['backend']}: {answer['state']}")
    return 0


def cmd_reload(args) -> int:
    answer = _control(args, "reload", path=str(Path(args.config).resolve()))
    if answer is None:
        return 1
    retired = f", retired (draining until their connections end): {', '.join(answer['retired'])}" \
        if answer["retired"] else ""
    print(f"reloaded: {answer['services']} services, {answer['backends']} backends{retired}")
    return 0


def cmd_cleanup(args) -> int:
    """Remove the kernel state a worker leaves when it stops (it keeps it for the next one)."""
    from .kernel.dataplane import Dataplane
    from .ops.instance import AlreadyRunning, hold_instance

    cfg = load(args.config)
    try:
        with hold_instance(cfg.table_name):
            Dataplane(cfg).remove()
    except AlreadyRunning as e:
        print(f"mplb-nfq cleanup: {e}; stop it first", file=sys.stderr)
        return 1
    return 0


def cmd_check(args) -> int:
    from .ops.check import backend_report, kernel_report

    report = backend_report() if args.backend else kernel_report()
    if args.config:
        cfg = load(args.config)
        report["config"] = {"path": cfg.path, "services": [s.name for s in cfg.services],
                            "backends": [b.name for b in cfg.backends], "valid": True}
        if cfg.cluster and not args.backend:
            from .ops.check import cluster_report

            report["features"].update(cluster_report(cfg.cluster))
            report["usable"] = report["usable"] and report["features"]["announcement device"]["ok"]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, item in report["features"].items():
            print(f"{'ok ' if item['ok'] else 'NO '} {name:28} {item['detail']}")
        if not args.backend:
            print(f"queue mode that `run` would use: {report['queue_mode']}")
        if args.config:
            print(f"config {cfg.path}: valid ({len(cfg.services)} services, {len(cfg.backends)} backends)")
    return 0 if report["usable"] else 1


def cmd_render_nft(args) -> int:
    from .kernel.nft import Nft, native_queue_supported
    from .kernel.ruleset import render_decide, render_ruleset

    cfg = load(args.config)
    mode = args.queue_mode or cfg.queue_mode
    native = native_queue_supported(Nft()) if mode == "auto" else mode == "native"
    tables = cfg.balancer().lookup_tables() if cfg.handshakes == "kernel" else {}
    sys.stdout.write(render_ruleset(cfg, native) + render_decide(cfg, tables))
    return 0


def cmd_inspect(args) -> int:
    from .inspect import CaptureError, inspect_file, render_text

    try:
        result = inspect_file(args.pcap, load(args.config) if args.config else None)
    except (CaptureError, OSError) as e:
        print(f"mplb-nfq inspect: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else render_text(result))
    return 0


def cmd_lab(args) -> int:
    from .lab.lab import LabSettings, run_lab

    settings = LabSettings.quick(args.balancers) if args.quick else LabSettings()
    if args.sizes:
        settings.sizes_mb = [float(s) for s in args.sizes.split(",")]
    if args.repeat:
        settings.repeat = args.repeat
    if args.tunnel and (args.family != "4" or args.dsr):
        print("mplb-nfq lab: --tunnel goes with IPv4 and the return path through the LB", file=sys.stderr)
        return 2
    if args.joins == "announced-port" and (args.family != "4" or args.tunnel):
        print("mplb-nfq lab: --joins announced-port goes with IPv4 and backends on the LAN", file=sys.stderr)
        return 2
    if args.balancers and (args.tunnel or args.joins != "token"):
        print("mplb-nfq lab: --balancers goes with tokens and direct server return", file=sys.stderr)
        return 2
    if (args.redis != "single" or args.faults) and not args.balancers:
        print("mplb-nfq lab: --redis and --faults go with --balancers", file=sys.stderr)
        return 2
    settings.family, settings.direct_return, settings.tunnel = args.family, args.dsr, args.tunnel
    settings.joins, settings.balancers, settings.redis, settings.faults = args.joins, args.balancers, args.redis, \
        args.faults
    return run_lab(settings, out_dir=args.out, as_json=args.json)


COMMANDS = {"run": cmd_run, "status": cmd_status, "drain": cmd_drain, "undrain": cmd_drain, "reload": cmd_reload,
            "cleanup": cmd_cleanup, "check": cmd_check, "render-nft": cmd_render_nft, "inspect": cmd_inspect,
            "lab": cmd_lab}
