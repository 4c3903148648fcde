"""LLM agents in a pipeline: researcher -> writer -> reviewer.

Runs without an API key: ``StandInModel`` produces deterministic text. To use
a real model, replace ``model`` with any object that has
``complete(prompt: str) -> str``, for example (with the ``openai`` package and
OPENAI_API_KEY set)::

    class OpenAIModel:
        def __init__(self, name="gpt-4o-mini"):
            from openai import OpenAI
            self.client, self.name = OpenAI(), name
        def complete(self, prompt):
            r = self.client.chat.completions.create(
                model=self.name, messages=[{"role": "user", "content": prompt}])
            return r.choices[0].message.content

Run: python examples/04_llm_agents.py
"""

from agentmesh import Agent, LocalHub


class StandInModel:
    """A deterministic stand-in for an LLM: no network, no key."""

    def complete(self, prompt: str) -> str:
        topic = prompt.split(":", 1)[-1].strip()
        if prompt.startswith("research"):
            return f"Facts about {topic}: it is encrypted end to end; the hub sees only ciphertext."
        if prompt.startswith("write"):
            return f"Article. {topic} In short: agents can trust the channel."
        return f"Review: clear and accurate ({len(topic.split())} words). Approved."


model = StandInModel()
hub = LocalHub()
user = Agent("user", hub=hub)
researcher = Agent("researcher", hub=hub)
writer = Agent("writer", hub=hub)
reviewer = Agent("reviewer", hub=hub)


@researcher.on_message
def research(msg):
    notes = model.complete(f"research: {msg.text}")
    print(f"[researcher] {notes}")
    researcher.send("writer", text=notes, type="notes", topic=msg.text)


@writer.on_message
def write(msg):
    draft = model.complete(f"write: {msg.text}")
    print(f"[writer] {draft}")
    writer.send("reviewer", text=draft, type="draft", topic=msg.payload["topic"])


@reviewer.on_message
def review(msg):
    verdict = model.complete(f"review: {msg.text}")
    print(f"[reviewer] {verdict}")
    reviewer.send("user", text=verdict, type="review", draft=msg.text)


final = []
user.on_message(final.append)
user.send("researcher", text="secure messaging for AI agents")
assert final and final[0].type == "review"
print(f"[user] final: {final[0].text}")
print(f"[user] draft was: {final[0].payload['draft']}")
