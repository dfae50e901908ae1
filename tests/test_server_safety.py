"""The Monitor on a shared port and as a research instrument: body cap, Host check, session ownership, per-client
limits, over-long input, state that survives a reload, export/import, before/after answers, steering toggles,
sessions that stream concurrently, and the plain-continuation separator. Real stories260k + its atlas and statistics.
"""
from __future__ import annotations

import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from neuronscope.server import Knowledge, Limits, Monitor, SessionStore, create_app
from neuronscope.server.guard import Guard, host_names
from neuronscope.server.monitor import PLAIN_SEPARATOR
from tests.test_server_support import LiveServer, _stories, sse_events, stories_atlas_dir

PROMPT = "Once upon a time there was a little dog"
BASE = "http://127.0.0.1"


@pytest.fixture(scope="module")
def subject():
    return _stories()


@pytest.fixture(scope="module")
def monitor(subject):
    return Monitor(subject, Knowledge.load(subject, stories_atlas_dir(True)))


@pytest.fixture(scope="module")
def app(monitor):
    return create_app(monitor)


def client(app, **kw) -> TestClient:
    return TestClient(app, base_url=BASE, **kw)


def new_session(c) -> str:
    r = c.post("/api/sessions")
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


def greedy(subject, text: str, n: int) -> str:
    ids = subject.tokenizer(text, return_tensors="pt")["input_ids"]
    return subject.decode(subject.generate_ids(ids, max_new_tokens=n)[0])


# ---- 1. safe on a shared port ---------------------------------------------------------------------------------
def test_a_body_over_the_limit_is_a_413_json_error(subject):
    c = client(create_app(Monitor(subject, limits=Limits(max_body_bytes=2000))))
    sid = new_session(c)
    r = c.post(f"/api/sessions/{sid}/chat", content=b'{"message": "' + b"x" * 5000 + b'"}',
               headers={"content-type": "application/json"})
    assert r.status_code == 413 and "the limit is 2000 bytes" in r.json()["error"]
    # no Content-Length (chunked): still capped
    r = c.post(f"/api/sessions/{sid}/chat", content=iter([b'{"message": "', b"x" * 3000, b'"}']),
               headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit of 2000 bytes" in r.json()["error"]
    assert c.get(f"/api/sessions/{sid}").json()["messages"] == []


def test_the_cap_answers_without_reading_the_whole_body():
    import asyncio
    reads, sent = [], []

    async def app(scope, receive, send):  # never reached
        raise AssertionError("the app must not see an over-long body")

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}  # an endless body

    async def send(msg):
        sent.append(msg)
    guard = Guard(app, max_body_bytes=4096, allowed_hosts=None)
    scope = {"type": "http", "method": "POST", "path": "/api/x", "headers": [(b"host", b"127.0.0.1")]}
    asyncio.run(guard(scope, receive, send))
    assert sent[0]["status"] == 413 and len(reads) == 5  # 5 KB read of an endless body, then the answer
    # with a Content-Length over the limit nothing is read at all
    reads.clear()
    sent.clear()
    scope["headers"].append((b"content-length", b"10000000"))
    asyncio.run(guard(scope, receive, send))
    assert sent[0]["status"] == 413 and reads == []


def test_a_foreign_host_is_refused(app):
    evil = TestClient(app, base_url="http://evil.example:8000")
    r = evil.get("/api/info")
    assert r.status_code == 400 and "evil.example" in r.json()["error"] and "--allow-host" in r.json()["error"]
    for base in ("http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000"):
        assert TestClient(app, base_url=base).get("/api/info").status_code == 200, base
    assert host_names("127.0.0.1") == {"127.0.0.1", "localhost", "::1"}
    assert host_names("10.0.0.5", ["monitor.lab"]) == {"10.0.0.5", "monitor.lab"}
    assert host_names("0.0.0.0") is None and host_names("127.0.0.1", ["*"]) is None
    assert host_names("0.0.0.0", ["monitor.lab"]) == {"monitor.lab"}


def test_sessions_belong_to_the_client_that_made_them(app, monitor):
    alice, mallory = client(app), client(app)
    sid = new_session(alice)
    assert alice.post(f"/api/sessions/{sid}/chat", json={"message": PROMPT, "max_new_tokens": 4}).status_code == 200
    for method, path, body in [("GET", "", None), ("GET", "/tokens", None), ("GET", "/export", None),
                               ("POST", "/chat", {"message": "hi"}), ("POST", "/reset", None),
                               ("POST", "/steerings", {"mode": "suppress", "neurons": [[0, 1]]}),
                               ("DELETE", "", None)]:
        r = mallory.request(method, f"/api/sessions/{sid}{path}", json=body)
        assert r.status_code == 404 and "No session" in r.json()["error"], (method, path, r.text)
    state = alice.get(f"/api/sessions/{sid}").json()
    assert len(state["messages"]) == 2 and state["steerings"] == []  # untouched
    # the token can also travel in a header (scripts); a bad token is replaced, not trusted
    token = alice.cookies["ns_client"]
    bare = TestClient(app, base_url=BASE)
    assert bare.get(f"/api/sessions/{sid}", headers={"X-Neuronscope-Client": token}).status_code == 200
    assert bare.get(f"/api/sessions/{sid}", headers={"X-Neuronscope-Client": "short"}).status_code == 404


def test_one_client_cannot_evict_another(subject):
    mon = Monitor(subject, limits=Limits(max_sessions=10, max_sessions_per_client=3))
    app = create_app(mon)
    victim, flood = client(app), client(app)
    keep = new_session(victim)
    made = [new_session(flood) for _ in range(40)]
    assert victim.get(f"/api/sessions/{keep}").status_code == 200
    assert mon.sessions.count(flood.cookies["ns_client"]) == 3  # its own oldest went
    assert [flood.get(f"/api/sessions/{s}").status_code for s in made[-3:]] == [200, 200, 200]
    assert flood.get(f"/api/sessions/{made[0]}").status_code == 404
    # fresh clients (new tokens) fill the store: then a new session is refused, nobody's is evicted
    others = [client(app) for _ in range(2)]
    for o in others:
        for _ in range(3):
            new_session(o)
    assert len(mon.sessions) == 10
    late = client(app)
    r = late.post("/api/sessions")
    assert r.status_code == 503 and "maximum of 10 sessions" in r.json()["error"]
    assert victim.get(f"/api/sessions/{keep}").status_code == 200


def test_over_long_input_is_a_400_that_says_the_limit(app):
    c = client(app)
    sid = new_session(c)
    r = c.post(f"/api/sessions/{sid}/chat", json={"message": "x" * 4001})
    assert r.status_code == 400
    assert r.json()["error"] == "The message has 4001 characters; the limit is 4000 characters."
    r = c.get("/api/concepts", params={"q": "d" * 201})
    assert r.status_code == 400 and "limit is 200" in r.json()["error"]
    assert c.get(f"/api/sessions/{sid}").json()["messages"] == []
    info = c.get("/api/info").json()
    assert info["limits"]["max_message_chars"] == 4000 and info["limits"]["max_body_bytes"] == 1 << 20


# ---- 2. state that survives --------------------------------------------------------------------------------------
def test_a_reload_mid_answer_loses_nothing(monitor, subject):
    """The client goes away after the first token; the server finishes the answer and keeps it."""
    want = greedy(subject, PROMPT, 60)
    with LiveServer(create_app(monitor)) as srv, httpx.Client(timeout=60) as http:
        sid = http.post(srv.url + "/api/sessions").json()["session_id"]
        with http.stream("POST", f"{srv.url}/api/sessions/{sid}/chat",
                         json={"message": PROMPT, "max_new_tokens": 60}) as r:
            first = next(r.iter_lines())
            assert first.startswith("data: ")
        # "reload": a new page asks for the state; the answer is being generated or already kept
        t0 = time.time()
        while True:
            state = http.get(f"{srv.url}/api/sessions/{sid}").json()
            if state["generating"] is None or time.time() - t0 > 30:
                break
            assert isinstance(state["generating"]["text"], str)
            time.sleep(0.02)
        assert [m["role"] for m in state["messages"]] == ["user", "assistant"]
        assert state["messages"][1]["content"] == want
        # a second tab (same client cookie) sees the same conversation
        with httpx.Client(timeout=60, cookies=http.cookies) as tab2:
            assert tab2.get(f"{srv.url}/api/sessions/{sid}").json()["messages"] == state["messages"]


def test_conversation_changes_wait_for_the_answer(monitor):
    s = monitor.sessions.create()
    events = monitor.send(s, PROMPT, max_new_tokens=30)
    from neuronscope.errors import NeuronscopeError
    with pytest.raises(NeuronscopeError, match="still being generated"):
        monitor.send(s, "again", max_new_tokens=3)
    list(events)
    assert s.generating is None and len(s.messages) == 2


def test_export_then_import_reproduces_the_answer(app, monitor, subject):
    c = client(app)
    sid = new_session(c)
    c.post(f"/api/sessions/{sid}/chat", json={"message": PROMPT, "max_new_tokens": 16})
    c.post(f"/api/sessions/{sid}/steerings", json={"mode": "clamp", "value": 8.0, "neurons": [[1, 2], [4, 16]],
                                                   "label": "my cluster"})
    c.post(f"/api/sessions/{sid}/steerings", json={"mode": "suppress", "neurons": [[3, 4]], "enabled": False})
    steered = c.post(f"/api/sessions/{sid}/regenerate", json={"max_new_tokens": 16, "stream": False}).json()
    exported = c.get(f"/api/sessions/{sid}/export").json()
    assert exported["model"]["fingerprint"] == subject.fingerprint
    assert [m["role"] for m in exported["messages"]] == ["user", "assistant"]
    assert exported["messages"][1]["content"] == steered["text"]
    # import into a new session (another client even): same conversation, steerings (on/off as they were)
    other = client(app)
    r = other.post("/api/sessions/import", json=exported)
    assert r.status_code == 201, r.text
    imp = r.json()
    assert imp["session_id"] != sid
    assert [m["content"] for m in imp["messages"]] == [m["content"] for m in exported["messages"]]
    assert [(s["label"], s["enabled"], s["n_neurons"]) for s in imp["steerings"]] == \
        [("my cluster", True, 2), (None, False, 1)]
    # greedy: regenerating the imported session gives the same steered answer
    again = other.post(f"/api/sessions/{imp['session_id']}/regenerate",
                       json={"max_new_tokens": 16, "stream": False}).json()
    assert again["text"] == steered["text"]
    # another model's export is refused with a sentence; nothing is created
    bad = dict(exported, model={"name": "x", "fingerprint": "0" * 16})
    n = len(monitor.sessions)
    r = other.post("/api/sessions/import", json=bad)
    assert r.status_code == 400 and "other weights" in r.json()["error"] and len(monitor.sessions) == n
    r = other.post("/api/sessions/import", json=dict(exported, format="nope"))
    assert r.status_code == 400 and "not a Monitor session export" in r.json()["error"]
    broken = dict(exported, steerings=[{"mode": "clamp", "neurons": [{"layer": 99, "neuron": 0, "value": 1}]}])
    assert other.post("/api/sessions/import", json=broken).status_code == 400
    # what steered an earlier answer is checked at import, not when a reload builds the page (it was a 500 there)
    answer = dict(exported["messages"][1], steered_by=[{"id": "st1", "mode": "clamp"}])
    garbled = dict(exported, messages=[exported["messages"][0], answer])
    r = other.post("/api/sessions/import", json=garbled)
    assert r.status_code == 400 and "Message 1" in r.json()["error"] and len(monitor.sessions) == n
    in_process = monitor.sessions.create()
    assert monitor.import_session(in_process, monitor.export(monitor.sessions.get(imp["session_id"],
                                  other.cookies["ns_client"]))).messages[1].content == steered["text"]


# ---- 4. the loop: before/after answers, toggles, clusters ----------------------------------------------------------
def test_regenerate_keeps_the_old_answer_beside_the_new_one(app, subject):
    c = client(app)
    sid = new_session(c)
    base = c.post(f"/api/sessions/{sid}/chat", json={"message": PROMPT, "max_new_tokens": 20,
                                                      "stream": False}).json()["text"]
    st = c.post(f"/api/sessions/{sid}/steerings", json={"mode": "clamp", "value": 8.0,
                                                        "neurons": [[1, 2], [3, 4], [4, 16]]}).json()
    new = c.post(f"/api/sessions/{sid}/regenerate", json={"max_new_tokens": 20, "stream": False}).json()["text"]
    assert new != base
    msg = c.get(f"/api/sessions/{sid}").json()["messages"][1]
    assert msg["content"] == new and [s["id"] for s in msg["steered_by"]] == [st["id"]]
    assert msg["previous"] == [{"content": base, "steered_by": []}]
    # toggle the steering off: the next answer is the unsteered one again, without retyping anything
    r = c.patch(f"/api/sessions/{sid}/steerings/{st['id']}", json={"enabled": False})
    assert r.status_code == 200 and r.json()["enabled"] is False
    off = c.post(f"/api/sessions/{sid}/regenerate", json={"max_new_tokens": 20, "stream": False}).json()
    assert off["text"] == base and not off["steered"]
    c.patch(f"/api/sessions/{sid}/steerings/{st['id']}", json={"enabled": True})
    on = c.post(f"/api/sessions/{sid}/regenerate", json={"max_new_tokens": 20, "stream": False}).json()
    assert on["text"] == new
    msg = c.get(f"/api/sessions/{sid}").json()["messages"][1]
    assert [p["content"] for p in msg["previous"]] == [base, new, base]
    assert c.patch(f"/api/sessions/{sid}/steerings/nope", json={"enabled": False}).status_code == 404


def test_clusters_are_sized_and_sortable_by_activation_or_attribution(app):
    c = client(app)
    sid = new_session(c)
    c.post(f"/api/sessions/{sid}/chat", json={"message": PROMPT, "max_new_tokens": 64})
    c.post(f"/api/sessions/{sid}/chat", json={"message": "Lily had a big red ball", "max_new_tokens": 64})
    d = c.get(f"/api/sessions/{sid}/clusters").json()
    assert d["clusters"] and d["sort"] == "activation"
    acts = [cl["activation"] for cl in d["clusters"]]
    assert acts == sorted(acts, reverse=True) and all(cl["size"] == len(cl["members"]) for cl in d["clusters"])
    rows = c.get(f"/api/sessions/{sid}/activations", params={"page_size": 300}).json()["rows"]
    by = {(r["layer"], r["neuron"], r["polarity"]): sum(abs(f["value"]) for f in r["fires"]) for r in rows}
    top = d["clusters"][0]
    assert top["activation"] == pytest.approx(sum(by[tuple(m)] for m in top["members"]), rel=1e-6)
    pos = c.get(f"/api/sessions/{sid}").json()["n_tokens"] - 2
    a = c.get(f"/api/sessions/{sid}/clusters", params={"sort": "attribution", "position": pos}).json()
    att = [cl["attribution"] for cl in a["clusters"]]
    assert att == sorted(att, reverse=True) and att[0] > 0
    assert c.get(f"/api/sessions/{sid}/clusters", params={"sort": "attribution"}).status_code == 400


def test_steering_a_cluster_by_its_members(app):
    c = client(app)
    sid = new_session(c)
    base = c.post(f"/api/sessions/{sid}/chat", json={"message": PROMPT, "max_new_tokens": 64,
                                                      "stream": False}).json()["text"]
    clusters = c.get(f"/api/sessions/{sid}/clusters").json()["clusters"]
    assert clusters
    changed = False
    for cl in clusters[:5]:
        members = [[m[0], m[1], 0 if m[2] == "pos" else 1] for m in cl["members"]]
        st = c.post(f"/api/sessions/{sid}/steerings", json={"mode": "strengthen", "strength": 1.5,
                                                            "neurons": members, "label": cl["name"]}).json()
        assert st["label"] == cl["name"] and st["n_neurons"] == len(members)
        new = c.post(f"/api/sessions/{sid}/regenerate", json={"max_new_tokens": 64, "stream": False}).json()
        c.delete(f"/api/sessions/{sid}/steerings/{st['id']}")
        if new["text"] != base:
            changed = True
            break
    assert changed


def test_neuron_detail_answers_without_a_model_call_then_with_marks(app, monitor):
    c = client(app)
    fast = c.get("/api/neurons/2/5", params={"n_exemplars": 3, "marks": False}).json()
    full = c.get("/api/neurons/2/5", params={"n_exemplars": 3}).json()
    assert fast["exemplars"]["pos"] and all(e["marks"] is None for e in fast["exemplars"]["pos"])
    assert [e["tokens"] for e in fast["exemplars"]["pos"]] == [e["tokens"] for e in full["exemplars"]["pos"]]
    assert all(len(e["marks"]) == len(e["tokens"]) for e in full["exemplars"]["pos"])
    assert monitor.neuron(2, 5, 3, True) is monitor.neuron(2, 5, 3, True)  # cached
    # the levels the small test corpus cannot resolve are marked, and the view says which level normalises
    info = monitor.knowledge.stats.level_info
    want = {str(lv): info.get(lv).mark for lv in monitor.knowledge.stats.levels if info.get(lv).mark}
    assert full["quantile_marks"] == want and want
    hi, lo = monitor.knowledge.stats.norm_levels()
    from neuronscope.stats.levels import fmt_level
    assert full["normalised_by"].startswith(f"positive / q({fmt_level(hi)}), negative / |q({fmt_level(lo)})|")


# ---- 5. responsive: sessions do not wait for each other's whole answers ----------------------------------------
def test_two_sessions_stream_concurrently(monitor):
    """The second session's first token arrives while the first session's answer is still streaming."""
    with LiveServer(create_app(monitor)) as srv, httpx.Client(timeout=120) as http:
        a = http.post(srv.url + "/api/sessions").json()["session_id"]
        b = http.post(srv.url + "/api/sessions").json()["session_id"]
        times: dict[str, list[float]] = {"a": [], "b": []}
        started = threading.Event()

        def stream(sid: str, key: str, n: int):
            with http.stream("POST", f"{srv.url}/api/sessions/{sid}/chat",
                             json={"message": PROMPT, "max_new_tokens": n}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        times[key].append(time.perf_counter())
                        started.set()
        ta = threading.Thread(target=stream, args=(a, "a", 256))
        ta.start()
        assert started.wait(30)
        tb = threading.Thread(target=stream, args=(b, "b", 4))
        tb.start()
        ta.join()
        tb.join()
    assert len(times["a"]) > 40  # a long answer (token events + done)
    assert times["b"][0] < times["a"][-1], "the second session waited for the first one's whole answer"
    assert times["b"][-1] < times["a"][-1]  # b's short answer finished while a was still streaming


def test_the_model_lock_serves_waiters_in_order():
    from neuronscope.server.decoding import FairLock
    lock, order = FairLock(), []
    lock.acquire()
    threads = [threading.Thread(target=lambda k=k: (lock.acquire(), order.append(k), lock.release()))
               for k in range(5)]
    for t in threads:
        t.start()
        time.sleep(0.02)  # each asks after the previous one
    lock.release()
    for t in threads:
        t.join()
    assert order == [0, 1, 2, 3, 4]


# ---- 6. a base model: plain continuation with a separator -----------------------------------------------------------
def test_plain_continuation_separates_turns(app, subject):
    c = client(app)
    sid = new_session(c)
    c.post(f"/api/sessions/{sid}/chat", json={"message": PROMPT, "max_new_tokens": 8})
    c.post(f"/api/sessions/{sid}/chat", json={"message": "The cat sat", "max_new_tokens": 8})
    toks = c.get(f"/api/sessions/{sid}/tokens").json()["tokens"]
    roles = [t["role"] for t in toks]
    sep = [t for t in toks if t["role"] == "separator"]
    assert "".join(t["text"] for t in sep).strip(" ") == PLAIN_SEPARATOR
    k = roles.index("separator")
    assert roles[k - 1] == "assistant" and roles[k + len(sep)] == "user"  # between the answer and the next turn
    assert roles[0] == "template"  # BOS
    # the model answered exactly: BOS, turn 1, answer 1, separator, turn 2
    tok = subject.tokenizer
    enc = lambda x: tok(x, add_special_tokens=False)["input_ids"]  # noqa: E731
    ans = subject.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    first = [t for t in subject.generate_ids(ans, max_new_tokens=8)[0].tolist() if t != tok.eos_token_id]
    want = [tok.bos_token_id] + enc(PROMPT) + first + enc(PLAIN_SEPARATOR) + enc("The cat sat")
    assert [t["id"] for t in toks[:len(want)]] == want
    # the activation view can leave template and separator tokens out
    d = c.get(f"/api/sessions/{sid}/activations", params={"content_only": True, "page_size": 1000}).json()
    assert all(roles[f["position"]] in ("user", "assistant") for r in d["rows"] for f in r["fires"]
               if f["position"] == r["position"])
    assert all(d["token_sums"][t] == 0 for t, r in enumerate(roles) if r not in ("user", "assistant"))


def test_store_limits_are_per_client():
    store = SessionStore(max_sessions=4, max_per_client=2)
    a1, a2, a3 = (store.create("a") for _ in range(3))
    assert store.get(a1.id, "a") is None and store.get(a3.id, "a") is a3 and store.get(a3.id, "b") is None
    b1, _ = store.create("b"), store.create("b")
    from neuronscope.server import StoreFull
    with pytest.raises(StoreFull):
        store.create("c")
    assert store.get(b1.id, "b") is b1 and store.get(a2.id, "a") is a2
    assert sse_events("data: {\"a\": 1}\n\n") == [{"a": 1}]
