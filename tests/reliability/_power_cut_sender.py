"""The sender of tests/reliability/test_power_cut.py, run as a subprocess.

``python _power_cut_sender.py PORT KEYFILE IMAGES ROUND COUNT``: alice sends COUNT
messages ``"<ROUND>-<i>"`` to bob over a hub at 127.0.0.1:PORT, in blocks of 20
alternating default ``send()`` and ``send(wait=False)`` followed by ``flush()``, and
prints ``acked <text>`` for each message the hub has acknowledged. Her state file
records every durable point under IMAGES (``AgentState._durable_image``), which the
test restores after killing her: what a power cut would have left. With
``AGENTMESH_TEST_NO_JUMP=1`` the counter jump after an unclean restart is disabled
(the defence removed, to see the test fail).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from agentmesh import Agent
from agentmesh.agent_core import AgentCore
from agentmesh.hub.client import NetworkHub
from agentmesh.state import AgentState

BLOCK = 20


def main() -> None:
    port, keyfile, images, round_name, count = sys.argv[1:6]
    AgentState._durable_image = Path(images)
    if os.environ.get("AGENTMESH_TEST_NO_JUMP") == "1":
        AgentCore._jump_reserved_counters = lambda self: 0  # type: ignore[method-assign]
    hub = NetworkHub(
        "127.0.0.1", int(port), connect_timeout=5.0, reconnect_initial=0.05, reconnect_max=0.3
    )
    alice = Agent("alice", hub=hub, keypair_path=keyfile, exit_flush_timeout_s=0)
    print(f"jumped {alice._core.chains_jumped}", flush=True)
    total = int(count)
    for start in range(0, total, BLOCK):
        texts = [f"{round_name}-{i}" for i in range(start, min(total, start + BLOCK))]
        pipelined = (start // BLOCK) % 2 == 1
        for text in texts:
            alice.send("bob", text=text, wait=not pipelined)
            if not pipelined:
                print(f"acked {text}", flush=True)
        if pipelined:
            if not alice.flush(30):
                raise SystemExit("flush timed out")
            for text in texts:
                print(f"acked {text}", flush=True)
    alice.close()
    hub.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()
