"""Step 01's engine: step 00's, with the model loaded once."""
from __future__ import annotations

import asyncio

from shared.models import LoadedModel, load_model, model_info, prepare
from step00_baseline.engine import BaselineEngine


class LoaderEngine(BaselineEngine):
    _lm: LoadedModel | None = None

    async def start(self) -> None:
        await asyncio.to_thread(prepare, self.cfg)
        self._lm = await asyncio.to_thread(load_model, self.cfg)
        self._info = model_info(self._lm)  # from now on /health answers 200

    def load_for_request(self) -> LoadedModel:
        assert self._lm is not None, "generate() before start() finished"
        return self._lm
