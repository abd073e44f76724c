"""Lesson 13: an OpenAI-compatible HTTP server over :class:`~nanoengine.engine.async_engine.AsyncEngine`.

``build_app(engine)`` gives a FastAPI app; ``nanoengine serve`` (:mod:`.launcher`) starts the
engine process and runs the app under uvicorn. The server only uses the engine's public
API: it checks and shapes requests and responses, the engine does the work.
"""

from __future__ import annotations
