"""A coordinator and 4 workers: tasks go out, results come back.

Run: python examples/02_multi_agent.py
"""

from agentmesh import Agent, LocalHub

hub = LocalHub()
coordinator = Agent("coordinator", hub=hub)
workers = [Agent(f"worker-{i}", hub=hub) for i in range(4)]
results: dict[str, int] = {}


def make_worker(worker: Agent):
    @worker.on_message
    def handle(msg):
        if msg.type == "task":
            numbers = msg.payload["numbers"]
            worker.send(
                msg.sender,
                text=f"sum of {numbers}",
                type="result",
                task_id=msg.payload["task_id"],
                value=sum(numbers),
            )


for w in workers:
    make_worker(w)


@coordinator.on_message
def collect(msg):
    if msg.type == "result":
        results[msg.payload["task_id"]] = msg.payload["value"]
        task, value = msg.payload["task_id"], msg.payload["value"]
        print(f"[coordinator] {msg.sender} finished {task}: {value}")


tasks = {f"task-{i}": list(range(i * 10, i * 10 + 5)) for i in range(8)}
peers = sorted(p for p in coordinator.list_peers() if p.startswith("worker-"))
for n, (task_id, numbers) in enumerate(tasks.items()):
    worker_id = peers[n % len(peers)]
    print(f"[coordinator] {task_id} -> {worker_id}")
    coordinator.send(
        worker_id, text="please add these", type="task", task_id=task_id, numbers=numbers
    )

assert results == {t: sum(nums) for t, nums in tasks.items()}, results
print(f"all {len(results)} results back; total = {sum(results.values())}")
