"""Version 1's network example, unmodified but for where the hub is (argv[1]).

No ``keypair_path``: both agents get a fresh random identity on every run. With the
version 2 foundation the second run failed with ``identity_mismatch`` for good.
"""

import sys
import time

from agentmesh import Agent, NetworkHub

hub = NetworkHub("127.0.0.1", int(sys.argv[1]))
alice = Agent("alice", hub=hub)
bob = Agent("bob", hub=hub)
got = []


@bob.on_message
def handle(msg):
    got.append(msg.text)


alice.send("bob", text="Hello over the network")
deadline = time.time() + 30
while not got and time.time() < deadline:
    time.sleep(0.05)
print(got)
alice.close()
bob.close()
hub.close()
