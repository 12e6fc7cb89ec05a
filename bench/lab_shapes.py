"""The paper's experiment in each deployment shape the lab has besides the default one: dual stack
behind direct server return, backends behind VXLAN tunnels, joins to the ports the backends
announce, and dual stack through two balancers.

    .venv/bin/python bench/lab_shapes.py [--sizes MB] [--repeat N] [--json]

Each shape is one `mplb-nfq lab --quick` run (its own namespaces, removed after it); prints, per
shape, the ratio of MPLB's throughput to the unaware balancer's at the largest size and the
judge's counts of joins (MPLB: every join at its connection's backend; the unaware balancer:
joins misrouted). The suite runs each shape's kernel tests (test_dualstack, test_tunnel,
test_joins, test_cluster); the ratios, which are measurements, are here."""
import argparse
import json
import subprocess
import sys
import tempfile

SHAPES = {
    "dual stack, DSR": ["--family", "dual", "--dsr"],
    "VXLAN tunnels": ["--tunnel", "vxlan"],
    "announced join ports": ["--joins", "announced-port"],
    "dual stack, 2 balancers": ["--balancers", "2", "--family", "dual"],
}


def run(shape_args: list[str], sizes: str, repeat: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="mplb-shapes-") as out:
        done = subprocess.run([sys.executable, "-m", "mplb_nfq", "lab", "--quick", "--json", "--sizes", sizes,
                               "--repeat", str(repeat), "--out", out, *shape_args],
                              capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    results = json.loads(done.stdout)
    return {"ratio": round(results["ratio"], 2), "size_mb": results["ratio_size_mb"],
            "mplb_joins": results["oracle"]["mplb"], "unaware_joins": results["oracle"]["unaware"],
            **({"joins_crossed": results["joins_crossed"]} if "joins_crossed" in results else {})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10", help="download sizes in MB, comma-separated (default 10)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = {}
    for shape, shape_args in SHAPES.items():
        report[shape] = run(shape_args, args.sizes, args.repeat)
        if not args.json:
            print(f"{shape:26} {json.dumps(report[shape])}", flush=True)
    if args.json:
        print(json.dumps(report, indent=2))
    return 1 if any("error" in r for r in report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
