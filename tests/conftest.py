import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# Real MPTCP captures from tcpdump's test suite (BSD licence, see captures/LICENSE.tcpdump).
CAPTURES = Path(__file__).parent / "captures"
