"""nanoengine's own logger, visible by default as vLLM's is.

The engine reports what it decided at start-up (model, dtype, KV cache capacity); users
should see that without configuring logging. Messages go to stderr through one handler on
the ``nanoengine`` logger, not the root logger, so an application's own logging set-up is
left alone; ``logging.getLogger("nanoengine").setLevel(logging.WARNING)`` silences it.
"""

from __future__ import annotations

import logging


def init_logger() -> logging.Logger:
    logger = logging.getLogger("nanoengine")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s nanoengine: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
