"""Beyond one server: replicas of any step behind a router (issue 16, in progress).

Central rule: the replicas run on an existing distributed engine (Ray Serve); the routing policy,
the part worth teaching, is ours and readable (``policies.py``).

Built so far: ``policies.py`` (round-robin, least-loaded, prefix-affinity with a load guard,
tiered pools, the router's global admission bound), tested on their own. Not built yet: the Ray
Serve application (``python -m cluster``), the HTTP router in front, the Redis response cache,
the model manager and the Kubernetes manifests.
"""
