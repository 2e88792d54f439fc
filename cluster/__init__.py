"""Beyond one server: replicas of any step behind a router (issue 16, in progress).

Central rule: the replicas run on an existing distributed engine (Ray Serve); the routing policy,
the part worth teaching, is ours and readable (``policies.py``).

Built so far: ``policies.py`` (round-robin, least-loaded, prefix-affinity with a load guard,
tiered pools, the router's global admission bound) and ``router.py`` (the OpenAI API in front of
replica URLs: one policy per request, streams relayed unchanged, a client's disconnect closing the
upstream, 429 at the bound, 503 for a replica that cannot be reached), tested against two real
step 07 servers. Not built yet: the Ray Serve application (``python -m cluster``: replicas as Serve
deployments, restarted by Ray), the Redis response cache, the model manager, the Kubernetes
manifests, and the figures.
"""
