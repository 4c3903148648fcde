"""Two agents, basic send and receive, fingerprints and status().

Run: python examples/01_simple_chat.py
"""

from agentmesh import Agent, LocalHub

hub = LocalHub()
alice = Agent("alice", hub=hub)
bob = Agent("bob", hub=hub)


@bob.on_message
def bob_handles(msg):
    print(f"[bob] from {msg.sender}: {msg.text}")
    if msg.text.endswith("?"):
        bob.send(msg.sender, text="Doing well, thanks! Fully end-to-end encrypted.")


@alice.on_message
def alice_handles(msg):
    print(f"[alice] from {msg.sender}: {msg.text}")


print(f"alice fingerprint: {alice.fingerprint}")
print(f"bob fingerprint:   {bob.fingerprint}")

alice.send("bob", text="Hello Bob, how are you?")
alice.send("bob", text="Here is some data.", type="data", values=[1, 2, 3])

print(f"safety number (compare out of band): {alice.safety_number('bob')}")
status = alice.status()
print(
    f"alice status: sessions={status['active_sessions']} peers={status['known_peers']} "
    f"handlers={status['handlers']}"
)
print(f"messages still queued on the hub: {hub.queued_count()}")
