"""Step 01 — load the model once, at start-up.

Central rule: the weights are loaded once, before the server reports ready; ``/health`` answers
503 until then. Each request runs the forward loop on its own thread, off the event loop, so
``/health`` and new requests are answered while tokens are being generated.

What changed from step 00: ``LoaderEngine`` overrides ``start`` (load after the conversion) and
``load_for_request`` (return the loaded model). Nothing else.

Left out on purpose: concurrent requests still run at the same time on their own threads and
compete for the same cores, so each is slower than it would be alone (step 02 queues them).
"""
