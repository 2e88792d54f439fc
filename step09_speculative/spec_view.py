"""Step 09's section of the playground's engine view: last step's drafts per sequence."""
from __future__ import annotations

from typing import Any

from step04_kvcache.engine_core import EngineCore


def spec_step(core: EngineCore) -> dict[str, Any]:
    """``{request id: [drafted, accepted]}`` for the last step's decodes that verified drafts."""
    return {"drafts": core.scheduler.last_drafts}
