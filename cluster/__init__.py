"""Beyond one server: N replicas of any step on Ray Serve, behind a router whose policies are ours.

Central rule: the replicas run on an existing distributed engine (Ray Serve places, health-checks
and restarts them; each is a step's own server, unchanged); the routing policy, the part worth
teaching, is plain code (``policies.py``), and requests go from the router straight to the
replicas' HTTP servers.

``python -m cluster`` runs it on a local Ray (or ``--address`` a Ray cluster); ``python -m
cluster.router`` runs the router alone over URLs or DNS names (Kubernetes: ``k8s/``). Optional:
the Redis response cache (``cache.py``) and the model manager (``manager.py``, ``/admin/models``).

Left out: retrying requests that reached a replica, autoscaling under Ray (Kubernetes' HPA does it
in ``k8s/``), GPUs per replica, a KV cache shared between replicas, rolling model updates.
"""
