"""Helpers for the Monitor's tests: a real atlas + corpus statistics of stories260k, built once per process."""
from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from functools import lru_cache
from pathlib import Path

from tests.conftest import CORPORA, SHARED

STATS_TOKENS = 6000
EMBEDDER = SHARED / "models" / "all-minilm-l6-v2"
if EMBEDDER.is_dir():  # descriptions' semantic index and clusters embed with it (no download in tests)
    os.environ.setdefault("NEURONSCOPE_EMBEDDER", str(EMBEDDER))
try:
    import neuronscope.describe  # noqa: F401  (issue 5's package; the Monitor degrades without it)
    HAVE_DESCRIBE = hasattr(neuronscope.describe, "describe_atlas")
except ImportError:
    HAVE_DESCRIBE = False


@lru_cache(maxsize=None)
def stories_atlas_dir(with_stats: bool = True) -> str:
    """build_atlas + compute_stats for stories260k into a temp folder (cached for the whole test process)."""
    from neuronscope.atlas import build_atlas
    subject = _stories()
    folder = Path(tempfile.mkdtemp(prefix="ns-monitor-atlas-"))
    build_atlas(subject, folder, progress=False)
    if with_stats:
        from neuronscope.stats import compute_stats
        corpus = CORPORA / "tinystories-sample" / "tinystories_sample.txt"
        if not corpus.is_file():  # a small fixture of our own when the shared corpus is missing
            corpus = folder.parent / "ns-monitor-corpus.txt"
            corpus.write_text("Once upon a time there was a little dog named Max. He liked to run and play.\n" * 200)
        compute_stats(subject, corpus, folder, tokens=STATS_TOKENS, progress=False)
        if HAVE_DESCRIBE:
            from neuronscope.describe import describe_atlas
            describe_atlas(folder, progress=False)  # labels from decodes + exemplars (no explainer LLM)
    return str(folder)


@lru_cache(maxsize=None)
def _stories():
    from neuronscope.subject import Subject

    from tests.conftest import STORIES
    return Subject.load(STORIES)


def sse_events(text: str) -> list[dict]:
    return [json.loads(chunk[6:]) for chunk in text.split("\n\n") if chunk.startswith("data: ")]


class LiveServer:
    """uvicorn serving an app on 127.0.0.1 and a free port, in a thread."""

    def __init__(self, app):
        import uvicorn
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if time.time() - t0 > 30:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
