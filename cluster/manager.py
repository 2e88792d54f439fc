"""The model manager: load and unload models at runtime, as Ray Serve applications.

Central rule: a model is a set of replica applications (``{id}.{tier}.{i}``), deployed without
waiting (``serve.run_many(..., wait_for_applications_running=False)``) and deleted the same way;
its progress is what Serve's controller says of those applications plus whether the router has
seen each replica healthy. Nothing is checked for the first time by Ray: the step must be one of
this repository's steps, the model an alias or a local directory (nothing downloads at run time),
and a bad field is a 400 naming it before anything is deployed.

Left out: rolling updates of a loaded model (unload, then load), and quotas.
"""
from __future__ import annotations

import dataclasses
import re
import threading
from pathlib import Path
from typing import Any, Callable

from ray import serve
from ray.serve.api import RunTarget

from cluster.policies import TIERS
from cluster.serve_app import REPO, RayEndpoints, ReplicaSpec, StepReplica, app_name
from shared.models import ALIASES

STEPS = tuple(sorted(p.parent.name for p in REPO.glob("step[0-9][0-9]_*/__main__.py")))
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AdminError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


@dataclasses.dataclass(frozen=True, slots=True)
class ModelSpec:
    id: str
    model: str
    step: str
    replicas: int = 1
    threads: int = 1
    cpus: float = 1.0  # Ray CPUs reserved per replica (placement); 0 = place anywhere
    tier: str = "quality"
    args: tuple[str, ...] = ()


def check_model(model: str) -> str:
    if model in ALIASES or (Path(model).is_dir() and (Path(model) / "config.json").is_file()):
        return model
    raise AdminError(400, f"model: `{model}` is neither an alias ({', '.join(ALIASES)}) nor a local model "
                          "directory with a config.json (nothing is downloaded at run time)", "model")


def parse_spec(body: Any) -> ModelSpec:
    """``POST /admin/models``'s body: ``{"model", "step", "replicas"?, "id"?, "threads"?, "cpus"?,
    "tier"?, "args"?}``; a 400 naming the first bad field."""
    if not isinstance(body, dict):
        raise AdminError(400, "the body must be a JSON object")
    unknown = set(body) - {f.name for f in dataclasses.fields(ModelSpec)}
    if unknown:
        raise AdminError(400, f"{sorted(unknown)[0]}: unknown field", sorted(unknown)[0])

    def field(name: str, kind: type, default: Any, ok: Callable[[Any], bool], rule: str) -> Any:
        value = body.get(name, default)
        if value is None or not isinstance(value, kind) or isinstance(value, bool) or not ok(value):
            raise AdminError(400, f"{name}: {rule}, got {value!r}", name)
        return value

    model = check_model(field("model", str, None, bool, "a model alias or local directory is required"))
    step = field("step", str, None, lambda s: s in STEPS, f"one of {', '.join(STEPS)}")
    args = field("args", list, [], lambda a: all(isinstance(x, str) for x in a), "a list of strings (the step's flags)")
    return ModelSpec(
        id=field("id", str, model, lambda s: bool(ID_RE.match(s)), "1-64 characters of letters, digits, '.', '_', '-'"),
        model=model, step=step,
        replicas=field("replicas", int, 1, lambda n: 1 <= n <= 64, "an integer in 1..64"),
        threads=field("threads", int, 1, lambda n: 1 <= n <= 256, "an integer in 1..256"),
        cpus=float(field("cpus", (int, float), 1, lambda n: 0 <= n <= 256, "a number in 0..256")),
        tier=field("tier", str, "quality", lambda t: t in TIERS, f"one of {TIERS}"), args=tuple(args))


class ModelManager:
    def __init__(self, endpoints: RayEndpoints, local: bool = True) -> None:
        self.endpoints, self.local = endpoints, local
        self.models: dict[str, list[ModelSpec]] = {}  # id -> its deployments (one per tier)
        self.lock = threading.Lock()  # admin calls run in threads: one at a time

    def load(self, spec: ModelSpec) -> None:
        """Deploy ``spec.replicas`` replica applications and return at once (blocking Serve calls:
        run it off the event loop). A second tier of a loaded id is added beside the first."""
        with self.lock:
            if any(s.tier == spec.tier for s in self.models.get(spec.id, ())):
                raise AdminError(409, f"id: `{spec.id}` already has a {spec.tier} tier; unload it first", "id")
            rspec = ReplicaSpec(spec.id, spec.step, spec.model, spec.threads, spec.tier, spec.args, self.local)
            deployment = StepReplica.options(ray_actor_options={"num_cpus": spec.cpus})
            targets = [RunTarget(deployment.bind(rspec), name=app_name(rspec, i), route_prefix=None)
                       for i in range(spec.replicas)]
            serve.run_many(targets, wait_for_applications_running=False)
            self.models.setdefault(spec.id, []).append(spec)
            apps = dict(self.endpoints.apps)  # replaced, not changed in place: the event loop reads it
            apps.update({app_name(rspec, i): rspec for i in range(spec.replicas)})
            self.endpoints.apps = apps

    def unload(self, model_id: str) -> list[str]:
        with self.lock:
            specs = self.models.pop(model_id, None)
            if specs is None:
                raise AdminError(404, f"The model `{model_id}` is not loaded.", "id")
            gone = [a for a, s in self.endpoints.apps.items() if s.id == model_id]
            self.endpoints.apps = {a: s for a, s in self.endpoints.apps.items() if s.id != model_id}
            for app in gone:
                serve.delete(app, _blocking=False)
            return gone

    def status(self, model_id: str, healthy: set[str]) -> dict[str, Any]:
        """Serve's view of each replica application plus the router's (``healthy``: replica names it
        has seen answer ``/health``)."""
        specs, apps_now = self.models.get(model_id), self.endpoints.apps
        if specs is None:
            raise AdminError(404, f"The model `{model_id}` is not loaded.", "id")
        serve_apps = serve.status().applications
        apps = {}
        for app, s in apps_now.items():
            if s.id == model_id:
                st = serve_apps.get(app)
                apps[app] = {"tier": s.tier, "serve_status": str(st.status.value) if st else "NOT_STARTED",
                             "message": st.message if st else "", "ready": app in healthy}
        failed = any(a["serve_status"] == "DEPLOY_FAILED" for a in apps.values())
        ready = sum(a["ready"] for a in apps.values())
        state = "failed" if failed else "ready" if ready == len(apps) else "loading"
        return {"id": model_id, "state": state, "replicas_ready": ready, "replicas": len(apps),
                "deployments": [dataclasses.asdict(s) for s in specs], "applications": apps}
