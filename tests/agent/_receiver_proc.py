"""Helper process for test_agent_crash.py (not a test module).

Usage: python _receiver_proc.py HUB_DB KEY_FILE LOG_FILE

Runs ``Agent("bob", hub=LocalHub(db=HUB_DB), keypair_path=KEY_FILE)``. Its
handler appends each message's text and a newline to LOG_FILE (flush and
fsync before returning). A LocalHub only pushes to agents registered in its
own process, so bob polls the shared hub database by registering again. On a
"stop" message bob replies "bye" to the sender, closes and exits 0.
"""

from __future__ import annotations

import os
import sys
import time

from agentmesh import Agent, LocalHub, Message


def main() -> int:
    hub_db, key_file, log_file = sys.argv[1:4]
    stop_from: list[str] = []
    log = open(log_file, "a", encoding="utf-8")

    def handle(msg: Message) -> None:
        if msg.text == "stop":
            stop_from.append(msg.sender)
            return
        log.write(msg.text + "\n")
        log.flush()
        os.fsync(log.fileno())

    hub = LocalHub(db=hub_db)
    bob = Agent("bob", hub=hub, keypair_path=key_file)
    bob.on_message(handle)  # dispatches what registering just took from the hub
    print("ready", flush=True)
    while not stop_from:
        time.sleep(0.02)
        hub.register(bob)  # fetch new mail from the shared database
    bob.send(stop_from[0], "bye")
    bob.close()
    hub.close()
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
