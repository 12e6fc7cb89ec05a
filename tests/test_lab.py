"""The paper's experiment, quick: MPLB must double the throughput of an MPTCP-unaware balancer."""
import json
import os
import subprocess
import sys

import pytest

from mplb_nfq.lab.netns import leftover_namespaces

pytestmark = [pytest.mark.kernel,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and nftables")]


def assert_judged(results, unaware_misrouted):
    """The judge's counts: through mplb-nfq every join reached its connection's backend and was
    taken; through the unaware balancer at least that many reached another backend."""
    mplb, unaware = results["oracle"]["mplb"], results["oracle"]["unaware"]
    assert mplb["joins"] >= 1 and (mplb["misrouted"], mplb["foreign"], mplb["late"]) == (0, 0, 0), mplb
    assert unaware["misrouted"] >= unaware_misrouted and unaware["foreign"] == 0, unaware


def test_quick_lab_doubles_throughput_and_leaves_nothing_behind(tmp_path):
    before = set(leftover_namespaces())
    done = subprocess.run([sys.executable, "-m", "mplb_nfq", "lab", "--quick", "--repeat", "2", "--sizes", "20",
                           "--json", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)
    assert results["ratio"] >= 1.8, results["ratio"]
    assert_judged(results, results["settings"]["repeat"])
    for mode in ("unaware", "mplb"):
        for entry in results["modes"][mode]["sizes"].values():
            assert len(entry["samples_s"]) == results["settings"]["repeat"]
            assert entry["ci_s"] >= 0
    assert (tmp_path / "lab.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "results.json").read_text())["ratio"] == results["ratio"]
    assert set(leftover_namespaces()) == before


def test_interrupted_lab_removes_its_namespaces(tmp_path):
    before = set(leftover_namespaces())
    lab = subprocess.Popen([sys.executable, "-m", "mplb_nfq", "lab", "--quick", "--out", str(tmp_path)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(100):  # wait until the lab is downloading
        if len(set(leftover_namespaces()) - before) >= 5:
            break
        subprocess.run(["sleep", "0.1"])
    assert set(leftover_namespaces()) - before, "the lab made no namespaces"
    subprocess.run(["sleep", "2"])
    lab.terminate()
    _, err = lab.communicate(timeout=60)
    assert lab.returncode == 130, err[-2000:]
    assert set(leftover_namespaces()) == before


def test_quick_lab_with_three_balancers_and_sentinel_through_faults_doubles_throughput_and_leaves_nothing(tmp_path):
    """Three balancers behind a router (BGP from BIRD, ECMP on L4), sharing tokens through Redis
    under Sentinel; while two transfers run, the Redis primary is killed (its replica promoted), a
    balancer's worker killed (and started again) and a backend's health checks fail and pass
    again. The transfers arrive whole, the judge sees no join astray, and nothing is left behind."""
    before = set(leftover_namespaces())
    done = subprocess.run([sys.executable, "-m", "mplb_nfq", "lab", "--balancers", "3", "--redis", "sentinel",
                           "--faults", "--quick", "--json", "--sizes", "20", "--repeat", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)
    assert results["balancers"] == 3 and results["joins_crossed"] >= 0 and results["misrouted_joins"] == 0
    assert (results["redis_failovers"], results["balancer_faults"], results["backend_flaps"]) == (1, 1, 1)
    assert results["transfers_across_faults"] == 2 and min(results["transfers_running_at_each_fault"]) >= 1, results
    assert results["ratio"] >= 1.8, results["ratio"]
    assert_judged(results, 2)
    for worker in results["modes"]["mplb"]["workers"].values():
        assert worker["cluster"]["redis"] == "connected" and worker["cluster"]["rejected"] == {}
    assert set(leftover_namespaces()) == before
    engines = subprocess.run(["pgrep", "-af", "bird .*mplb-lab-|redis-server 10.0.9.250"], capture_output=True,
                             text=True).stdout
    assert not engines, engines
