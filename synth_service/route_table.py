"""A module's routes, declared with the usual decorators and added to the app by `create_app`.

Not `APIRouter` + `include_router`: in the pinned FastAPI (docker/requirements.txt) an included router stays one
opaque entry in `app.routes`. `app.add_api_route` gives exactly the routes `@app.get(...)` would, each listed in
`app.routes` (the auth test walks them to call every path).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI


class RouteTable:
    def __init__(self, **defaults: Any) -> None:
        self.defaults = defaults  # e.g. tags, applied to every route of the table
        self.entries: list[tuple[str, Callable, dict[str, Any]]] = []

    def route(self, path: str, methods: list[str], **options: Any) -> Callable[[Callable], Callable]:
        def add(endpoint: Callable) -> Callable:
            self.entries.append((path, endpoint, {**self.defaults, **options, "methods": methods}))
            return endpoint
        return add

    def get(self, path: str, **options: Any) -> Callable[[Callable], Callable]:
        return self.route(path, ["GET"], **options)

    def post(self, path: str, **options: Any) -> Callable[[Callable], Callable]:
        return self.route(path, ["POST"], **options)

    def put(self, path: str, **options: Any) -> Callable[[Callable], Callable]:
        return self.route(path, ["PUT"], **options)

    def delete(self, path: str, **options: Any) -> Callable[[Callable], Callable]:
        return self.route(path, ["DELETE"], **options)

    def add_to(self, app: FastAPI) -> None:
        for path, endpoint, options in self.entries:
            app.add_api_route(path, endpoint, **options)
