"""One replica as the router sees it, and the OpenAI-shaped errors the router answers itself."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from fastapi.responses import JSONResponse

from cluster.policies import ReplicaLoad


def error(status: int, message: str, code: str, param: str | None = None, retry_after: int | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
            409: "invalid_request_error", 429: "rate_limit_error", 500: "internal_error"}.get(status, "service_unavailable")
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status, headers)


@dataclasses.dataclass
class Replica:
    name: str
    url: str
    tier: str = "quality"
    identity: str = ""
    model: str | None = None  # the id it reports on /v1/models
    card: dict[str, Any] | None = dataclasses.field(default=None, repr=False)
    outstanding: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    healthy: bool = False
    num_routed: int = 0

    def load(self) -> ReplicaLoad:
        return ReplicaLoad(self.name, self.outstanding, self.num_waiting, self.kv_usage, self.tier)

    def cache_identity(self) -> str:
        card = {k: v for k, v in (self.card or {}).items() if k != "created"}
        return json.dumps([self.identity, card], sort_keys=True)
