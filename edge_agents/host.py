"""`AgentHost`: several edge agents in one asyncio process, run as one Ray actor.

Agents are I/O bound (they wait on the simulated link and on the server), so one process can host
many; 64 agents as 64 processes would cost a Python interpreter each on a 2-core laptop.
`agents_per_actor: 1` gives one actor per agent where that isolation is wanted. Records stream to
the driver through `drain()`, so a driver that stops early still has every finished query.
"""

from __future__ import annotations

import asyncio
import traceback

from edge_agents.agent import EdgeAgent
from edge_agents.config import LoadTestConfig


class AgentHost:
    def __init__(self, indices: list[int], config: dict, channel=None, policy: str | None = None):
        cfg = LoadTestConfig.model_validate(config)
        self._rows: list[dict] = []
        self.agents = [EdgeAgent(i, cfg, channel=channel, policy=policy, on_record=self._collect) for i in indices]
        self._task: asyncio.Task | None = None
        self._failures: list[str] = []

    def _collect(self, log) -> None:
        self._rows.append(log.to_row())

    def ready(self) -> int:
        """How many agents this host runs (items are loaded by now)."""
        return len(self.agents)

    async def start(self, run_start: float) -> None:
        for agent in self.agents:
            agent.run_start = run_start
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        results = await asyncio.gather(*(a.run() for a in self.agents), return_exceptions=True)
        for agent, result in zip(self.agents, results):
            if isinstance(result, BaseException):
                self._failures.append(
                    f"{agent.name}: " + "".join(traceback.format_exception_only(type(result), result)).strip()
                )

    async def drain(self) -> dict:
        """Rows finished since the last call, whether every agent is done, and agent crashes."""
        rows, self._rows = self._rows, []
        return {
            "rows": rows,
            "done": self._task is not None and self._task.done(),
            "failures": list(self._failures),
            "in_flight": sum(a.in_flight for a in self.agents),
        }

    async def stop(self) -> None:
        for agent in self.agents:
            agent.stop()
