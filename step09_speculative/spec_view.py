"""Step 09's section of the playground's engine view: each running sequence's drafts."""
from __future__ import annotations

from typing import Any

from step04_kvcache.engine_core import EngineCore


def spec_step(core: EngineCore) -> dict[str, Any]:
    """``{request id: [drafted last step, kept last step, drafted so far, kept so far]}`` for the
    running sequences that have verified drafts."""
    last = core.scheduler.last_drafts
    return {"drafts": {s.request_id: [*last.get(s.request_id, (0, 0)), s.num_drafted, s.num_kept]
                       for s in list(core.scheduler.running) if s.num_drafted}}
