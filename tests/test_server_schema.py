"""Fuzz the Monitor's OpenAPI schema with schemathesis, in-process (ASGI): no 5xx, responses match the schema.

Half of the generated requests that name a session get a live session with a conversation, so the fuzzer reaches
the views and the steering logic, not only the 404 path.
"""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from neuronscope.server import Knowledge, Limits, Monitor, create_app
from tests.test_server_support import _stories, stories_atlas_dir

EXAMPLES = 12
TOKEN = "fuzz-client-token-0123456789"  # the fuzzer's client token: it owns the live session
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_app():
    subject = _stories()
    mon = Monitor(subject, Knowledge.load(subject, stories_atlas_dir(True)),
                  limits=Limits(max_new_tokens=6, max_tokens=160))
    app = create_app(mon, allowed_hosts=("testserver", "localhost", "127.0.0.1"))  # the fuzzer's Host names
    app.state.live = {}
    return app


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    return schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)


def _live_session(app) -> str:
    mon = app.state.monitor
    sid = app.state.live.get("sid")
    s = mon.sessions.get(sid, TOKEN) if sid is not None else None
    if s is None or s.generating is not None or len(mon.render(s).ids) > 120:
        s = mon.sessions.create(TOKEN)
        for _ in mon.send(s, "Once upon a time there was a dog", max_new_tokens=6):
            pass
        sid = app.state.live["sid"] = s.id
    return sid


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_openapi_fuzz(fuzz_app, api_schema, mode):
    ops = [r.ok() for r in api_schema.get_all_operations()]
    assert len(ops) >= 14
    seen = set()
    for op in ops:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  phases=[Phase.explicit, Phase.generate])
        def run(case):
            params = case.path_parameters or {}
            if "sid" in params and hash(repr(case.body) + repr(case.query)) % 2 == 0:
                params["sid"] = _live_session(fuzz_app)
                case.headers = {**(case.headers or {}), "X-Neuronscope-Client": TOKEN}
            response = case.call_and_validate(checks=CHECKS)
            seen.add((case.operation.method.upper(), case.operation.path, response.status_code))
        try:
            run()
        except Unsatisfiable:  # nothing invalid to send to an operation without parameters
            assert mode == GenerationMode.NEGATIVE
    # the fuzzer got past validation into the real logic, not only 4xx
    if mode == GenerationMode.POSITIVE:
        assert any(code < 300 and "{sid}" in path for _, path, code in seen)
    else:
        assert any(400 <= code < 500 for _, _, code in seen)
