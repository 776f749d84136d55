"""Adding the page's routes to a scheduler's running tornado application."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tornado.routing import PathMatches, Rule, RuleRouter

from .routes import PageHandler, routes

__all__ = ["add_routes"]


def add_routes(application: Any, scheduler: Any) -> str:
    """Route ``/flowyml`` on ``application`` unless it does already; the routes' prefix.

    The prefix is the one Dask gave its own routes (``dask scheduler
    --dashboard-prefix``), read from its ``/health`` route.
    """
    prefix = _prefix(application)
    if not any(rule.target is PageHandler for rule in _rules(application)):
        application.add_handlers(
            r".*", [(prefix + url, cls, {**kwargs, "dask_server": scheduler}) for url, cls, kwargs in routes]
        )
    return prefix


def _prefix(application: Any) -> str:
    for rule in _rules(application):
        if isinstance(rule.matcher, PathMatches):
            pattern = rule.matcher.regex.pattern.rstrip("$")
            if pattern.endswith("/health"):
                return pattern[: -len("health")]
    return "/"


def _rules(application: Any) -> Iterator[Rule]:
    seen: set[int] = set()
    stack: list[Any] = [application.default_router, application.wildcard_router]
    while stack:
        router = stack.pop()
        if id(router) in seen:
            continue
        seen.add(id(router))
        for rule in router.rules:
            yield rule
            if isinstance(rule.target, RuleRouter):
                stack.append(rule.target)
