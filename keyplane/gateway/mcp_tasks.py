"""MCP tasks (protocol 2025-11-25) through the gateway: which key created which task, from which tool.

A task-augmented request (``tools/call`` with ``params.task``) answers a task id at once; the client then
polls ``tasks/get``, fetches ``tasks/result`` (the tool's answer), ``tasks/cancel``s it, or sees it in
``tasks/list``. The upstream sees one client (keyplane's credentials) for every key, so keyplane binds a
task to the key and tool that created it, as it binds sessions:

    tools/call + task  ─ answer carries result.task.taskId ─ remember (server, taskId) → (key, tool)
    tasks/get|result|cancel {taskId}
        known here   → only the key that created it, and only while it may still call that tool
        unknown here → access to the server (a task made through another process, or before a restart)
    tasks/list       → the answer lists only the tasks this key created through this process

The memory is bounded (oldest forgotten first) and per process: nothing costs in proportion to history.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson

MAX_TASKS = 10_000


@dataclass(frozen=True, slots=True)
class TaskOrigin:
    key_id: str
    tool: str


class TaskRegistry:
    def __init__(self, max_tasks: int = MAX_TASKS) -> None:
        self.max_tasks = max_tasks
        self._tasks: OrderedDict[tuple[str, str], TaskOrigin] = OrderedDict()

    def remember(self, server: str, task_id: str, key_id: str, tool: str) -> None:
        self._tasks[(server, task_id)] = TaskOrigin(key_id, tool)
        self._tasks.move_to_end((server, task_id))
        while len(self._tasks) > self.max_tasks:
            self._tasks.popitem(last=False)

    def origin(self, server: str, task_id: str) -> TaskOrigin | None:
        return self._tasks.get((server, task_id))

    def remember_answer(self, server: str, key_id: str, tool: str, raw: bytes) -> None:
        """Record the task a (JSON-RPC, JSON or SSE ``data:``) answer to a task-augmented call created."""
        if b'"taskId"' not in raw:
            return
        for line in raw.splitlines():
            body = line[5:].strip() if line.startswith(b"data:") else line.strip()
            if b'"taskId"' not in body:
                continue
            try:
                message = orjson.loads(body)
            except orjson.JSONDecodeError:
                continue
            task_id = created_task_id(message)
            if task_id is not None:
                self.remember(server, task_id, key_id, tool)

    def visible(self, server: str, key_id: str, task: Any) -> bool:
        """Is this ``tasks/list`` entry one this key created (through this process)?"""
        if not isinstance(task, dict) or not isinstance(task.get("taskId"), str):
            return False
        origin = self._tasks.get((server, task["taskId"]))
        return origin is not None and origin.key_id == key_id


def created_task_id(message: Any) -> str | None:
    """``result.task.taskId`` of a CreateTaskResult."""
    if not isinstance(message, dict):
        return None
    result = message.get("result")
    task = result.get("task") if isinstance(result, dict) else None
    task_id = task.get("taskId") if isinstance(task, dict) else None
    return task_id if isinstance(task_id, str) else None


def is_task_augmented(message: Any) -> bool:
    params = message.get("params") if isinstance(message, dict) else None
    return isinstance(params, dict) and isinstance(params.get("task"), dict)
