"""Dependencies of the routes, each with an ``Annotated`` alias.

They are ``async def`` on purpose: they only read app state, and FastAPI would run a
plain ``def`` dependency in a worker thread, a cost paid on every hot-path request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import Depends, Header, Request, params
from lrserve.service.api.fast_reads import HistoryAnswers
from lrserve.service.auth import Authenticator, Identity
from lrserve.service.liveness import Liveness
from lrserve.service.runs.manager import RunManager
from lrserve.service.settings import Settings
from lrserve.service.store.base import BaseStore

T = TypeVar("T")

# app.state is untyped (Starlette's State): each value is annotated as create_app sets it.


async def get_manager(request: Request) -> RunManager:
    manager: RunManager = request.app.state.manager
    return manager


async def get_store(request: Request) -> BaseStore:
    store: BaseStore = request.app.state.manager.store
    return store


async def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_history_answers(request: Request) -> HistoryAnswers:
    answers: HistoryAnswers = request.app.state.history_answers
    return answers


async def get_liveness(request: Request) -> Liveness:
    liveness: Liveness = request.app.state.liveness
    return liveness


ManagerDep = Annotated[RunManager, Depends(get_manager)]
StoreDep = Annotated[BaseStore, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
LivenessDep = Annotated[Liveness, Depends(get_liveness)]
HistoryAnswersDep = Annotated[HistoryAnswers, Depends(get_history_answers)]


def access(required: str) -> params.Depends:
    """The dependency that checks the request's token has the ``required`` role and gives its
    ``Identity`` (401/403 otherwise)."""

    async def check(request: Request, authorization: Annotated[str | None, Header()] = None) -> Identity:
        auth: Authenticator = request.app.state.auth
        return auth.require(authorization, required)

    dependency: params.Depends = Depends(check)  # declared Any, made a params.Depends
    return dependency


# As ``dependencies=[...]`` when the route only checks the role; as a parameter's
# ``Annotated[Identity, AdminAccess]`` when it needs who acts (the actor of its events).
ReadAccess = access("read")
WriteAccess = access("write")
AdminAccess = access("admin")


async def small_or_in_thread(manager: RunManager, call: Callable[[], T]) -> T:
    """``call()`` right here on the event loop where it goes through at once with little work
    (``RunManager.now``: SQLite, nothing to wait for), else in a worker thread
    (``RunManager.in_commit_thread``): for routes whose usual work is a small commit or a read,
    which a hop to a thread and back costs more than."""
    answer = manager.now(call)
    if answer is not None:
        return answer
    return await manager.in_commit_thread(call)
