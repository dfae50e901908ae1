"""The Monitor web app: chat with a model and watch its neurons fire, attribute tokens, steer by concept.

    from neuronscope.server import Monitor, Knowledge, create_app
    app = create_app(Monitor(subject, Knowledge.load(subject, "atlas_dir")))

`Monitor` holds the logic (usable from a notebook), `create_app` the HTTP front, `static/` the page.
"""
from .app import create_app
from .knowledge import Knowledge
from .limits import Limits
from .monitor import Monitor
from .sessions import Session, SessionStore, StoreFull

__all__ = ["create_app", "Monitor", "Knowledge", "Limits", "Session", "SessionStore", "StoreFull"]
