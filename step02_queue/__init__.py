"""Step 02 — a request queue served in order by one worker.

Central rule: at most one request runs at a time; the rest wait in a FIFO queue. Running one
request at a time gives it both cores, so the first in line finishes sooner than under step 01's
free-for-all, and the server's memory no longer grows with the number of clients.

What changed from step 01: ``generate`` puts the request on ``waiting`` and reads its tokens from
a per-request queue; a single ``_worker`` task takes requests in order and runs step 01's forward
loop. A client that disconnects while waiting is removed from ``waiting`` (it never runs); one
that disconnects mid-generation stops its generation within one token.

Left out on purpose: running several requests in one forward pass (step 03 batches them).
"""
