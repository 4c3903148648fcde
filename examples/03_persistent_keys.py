"""Keys saved to disk: run it twice and the same fingerprints appear.

Run: python examples/03_persistent_keys.py [folder]   (default: ./agentmesh_keys)
The key files (mode 0600) and the state files next to them live in that folder.
"""

import sys
from pathlib import Path

from agentmesh import Agent, LocalHub

folder = Path(sys.argv[1] if len(sys.argv) > 1 else "agentmesh_keys")
first_run = not (folder / "alice.json").exists()

hub = LocalHub()
alice = Agent("alice", hub=hub, keypair_path=folder / "alice.json")
bob = Agent("bob", hub=hub, keypair_path=folder / "bob.json")

received = []
bob.on_message(lambda msg: received.append(msg.text))
alice.send("bob", text="Same keys, new run." if not first_run else "First run: keys created.")

print("first run: new keys created" if first_run else "keys loaded from disk")
print(f"alice fingerprint: {alice.fingerprint}")
print(f"bob fingerprint:   {bob.fingerprint}")
print(f"bob received: {received}")
print(f"key files in {folder.resolve()}: run again to see the same fingerprints")
alice.close()
bob.close()
