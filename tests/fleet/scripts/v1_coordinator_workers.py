"""A coordinator and workers, written against version 1's API and run unmodified.

Version 1's multi-agent example used ``w.id`` in the workers' replies and looked at
``msg.raw_envelope``; with the version 2 foundation that raised AttributeError inside
the handlers and every result was lost (issue 12). Nothing here may use a version 2 name.
"""

from agentmesh import Agent, LocalHub

hub = LocalHub()
coordinator = Agent("coordinator", hub=hub)
workers = [Agent(f"worker-{i}", hub=hub) for i in range(3)]
results = []


def make_handler(w):
    def handle(msg):
        if msg.payload.get("type") == "task":
            w.send(msg.sender, text=f"[{w.id}] completed: {msg.text}", type="result")

    return handle


for w in workers:
    w.on_message(make_handler(w))


@coordinator.on_message
def collect(msg):
    assert isinstance(msg.raw_envelope, bytes) and len(msg.raw_envelope) > 0
    results.append(msg.text)


for i, w in enumerate(workers):
    coordinator.send(w.id, text=f"task {i}", type="task")

for line in sorted(results):
    print(line)
assert len(results) == len(workers), results
print(f"{hub.message_count()} messages routed")
