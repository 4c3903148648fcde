"""The fleet of tests/reliability/test_power_cut_localhub.py, run as a subprocess.

``python _power_cut_localhub.py DIR IMAGES ROUND COUNT``: alice and bob, with key
files in DIR, share an in-memory LocalHub. Alice sends COUNT messages
``"<ROUND>-<i>"`` to bob with default ``send()`` and prints ``acked <text>`` once each
returns; bob's handler prints ``handled <text> <message id> <ratchet key> <counter>``
and answers every fifth message, which alice's handler prints as ``reply ...`` alike.
Receipts commit without an fsync here (their handlers ran before the send returned),
so a power cut rolls both agents' receiving chains back; both state files record
every durable point under IMAGES (``AgentState._durable_image``), which the test
restores after killing the process: what a power cut would have left.
"""

from __future__ import annotations

import sys
from pathlib import Path

from agentmesh import Agent, LocalHub, Message
from agentmesh.state import AgentState
from agentmesh.wire.envelope import decode_envelope


def _line(kind: str, msg: Message) -> str:
    envelope = decode_envelope(msg.raw_envelope)
    return f"{kind} {msg.text} {msg.message_id} {envelope.ratchet.dh.hex()} {envelope.ratchet.n}"


def main() -> None:
    directory, images, round_name, count = sys.argv[1:5]
    AgentState._durable_image = Path(images)
    hub = LocalHub()
    alice = Agent("alice", hub=hub, keypair_path=Path(directory) / "alice.json")
    bob = Agent("bob", hub=hub, keypair_path=Path(directory) / "bob.json")

    def bob_handles(msg: Message) -> None:
        print(_line("handled", msg), flush=True)
        if int(msg.text.rsplit("-", 1)[1]) % 5 == 0:
            bob.send("alice", text=f"re:{msg.text}")

    def alice_handles(msg: Message) -> None:
        print(_line("reply", msg), flush=True)

    bob.on_message(bob_handles)
    alice.on_message(alice_handles)
    print(f"jumped {alice._core.chains_jumped} {bob._core.chains_jumped}", flush=True)
    for i in range(int(count)):
        text = f"{round_name}-{i}"
        alice.send("bob", text=text)
        print(f"acked {text}", flush=True)
    alice.close()
    bob.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()
