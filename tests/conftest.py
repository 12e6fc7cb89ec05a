import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Real MPTCP captures from tcpdump's test suite (BSD licence, see captures/LICENSE.tcpdump).
CAPTURES = Path(__file__).parent / "captures"


def start_server(topo, name):
    from mplb_nfq.lab.lab import PORT

    proc = topo.python(name, "mplb_nfq.lab.transfer", "serve", "--port", str(PORT),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if topo.exec(name, "ss", "-Hltn", f"sport = :{PORT}", capture_output=True).stdout.strip():
            break
        time.sleep(0.05)
    topo.servers[name] = proc
    return proc


def lab_topology(direct_return=False, tunnel=None):
    """The lab topology (client, LB, switch, 2 backends serving downloads), the judge watching its joins."""
    from mplb_nfq.lab.judge import Judge
    from mplb_nfq.lab.netns import Topology, leftover_namespaces

    with Topology(backends=2, direct_return=direct_return, tunnel=tunnel) as t:
        t.servers = {}
        for name in t.backend_names:
            start_server(t, name)
        with Judge(t) as t.judge:
            yield t
    assert not [n for n in leftover_namespaces() if t.tag in n]


@pytest.fixture(scope="session")
def topo():
    """The lab topology, shared by the modules that take it as it is (each test puts back what
    it changes); modules that need another shape build theirs."""
    yield from lab_topology()


@pytest.fixture
def worker(topo, tmp_path):
    """start(mode, extra TOML, or a whole config text) runs the worker in the LB namespace; it is
    stopped and cleaned up after."""
    from mplb_nfq.lab.lab import WorkerProcess, config_text

    started = []

    def start(mode="mplb", extra="", text=None, metrics="", kernel=""):
        config = tmp_path / f"{mode}.toml"
        config.write_text(text or config_text(mode, 2, tmp_path, metrics=metrics, extra=extra, kernel=kernel,
                                              direct_return=topo.direct_return, tunnel=topo.tunnel))
        w = WorkerProcess(topo, config, tmp_path / f"{mode}.log")
        started.append(w)
        return w

    yield start
    for w in started:
        if w.proc.poll() is None:
            w.stop()
    for w in started:
        if not w.cleaned:  # killed, or stopped leaving its state: cleanup removes it
            topo.exec("lb", sys.executable, "-m", "mplb_nfq", "cleanup", "-c", str(w.config_path))
