"""The paper's four chain tasks, by name."""

from fthss.errors import ConfigError
from fthss.tasks.base import Task, TaskRecord
from fthss.tasks.compress_qa import CompressQA
from fthss.tasks.memory_reasoning import MemoryReasoning
from fthss.tasks.retrieval_tasks import ActiveRAG, RewriteQA

TASKS = {t.name: t for t in (CompressQA, RewriteQA, MemoryReasoning, ActiveRAG)}


def get_task(name: str, **options) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task '{name}'; choose one of {sorted(TASKS)}")
    return TASKS[name](**options)


__all__ = ["TASKS", "Task", "TaskRecord", "get_task"]
