"""bench/scale.py at a small N: the state of N connections built on the kernel, the worker
restarted after a crash (the token map read back) and after a graceful stop (the snapshot), ends
of connections followed to the token map, and nothing left behind. The figures at a million are
the bench's (bench/README.md); this proves that the bench and the paths it measures work."""
import json
import subprocess
import sys
from pathlib import Path

from netlab import KERNEL

from mplb_nfq.kernel.snapshot import DIRECTORY

pytestmark = KERNEL
BENCH = Path(__file__).resolve().parents[1] / "bench" / "scale.py"
CONNTRACK_MAX = Path("/proc/sys/net/netfilter/nf_conntrack_max")


def namespaces() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listing.splitlines() if line.strip()}


def snapshots() -> set[Path]:
    return {p for p in DIRECTORY.glob("*") if p.suffix in (".tokens", ".flows")} if DIRECTORY.exists() else set()


def test_the_scale_bench_restarts_both_ways_follows_every_end_and_leaves_nothing_behind():
    before = (namespaces(), snapshots(), CONNTRACK_MAX.read_text())
    done = subprocess.run([sys.executable, str(BENCH), "--connections", "2000", "--quick", "--json"],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout)
    assert found["build"]["conntrack_created"] == 2000
    assert (found["adoption_after_crash_from"], found["adoption_after_crash_tokens"]) == ("map", 2000)
    assert (found["adoption_from"], found["adoption_tokens"]) == ("snapshot", 2000)
    assert found["follower"]["watched"] == 2000 and found["follower"]["full_readings"] >= 1
    assert found["token_removal"]["ended"] == 1000 and found["token_removal"]["not_removed"] == 0, found
    assert found["scrape"]["bytes"] > 0 and found["table_write_ms"] > 0
    assert (namespaces(), snapshots(), CONNTRACK_MAX.read_text()) == before
