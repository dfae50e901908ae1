"""The Monitor's JSON API on the real stories260k model with a real atlas + corpus statistics."""
from __future__ import annotations

import threading

import pytest
import torch
from fastapi.testclient import TestClient

from neuronscope.attribution import attribute
from neuronscope.interventions import Capture, Clamp, intervene
from neuronscope.server import Knowledge, Limits, Monitor, SessionStore, create_app
from tests.conftest import wait_for_url
from tests.test_server_support import HAVE_DESCRIBE, _stories, sse_events, stories_atlas_dir

PROMPT = "Once upon a time there was a little dog"


@pytest.fixture(scope="module")
def subject():
    return _stories()


@pytest.fixture(scope="module")
def atlas_dir():
    return stories_atlas_dir(True)


@pytest.fixture(scope="module")
def monitor(subject, atlas_dir):
    return Monitor(subject, Knowledge.load(subject, atlas_dir))


@pytest.fixture(scope="module")
def client(monitor):
    return Client(create_app(monitor))


def Client(app, **kw) -> TestClient:
    """A test client that reaches the app by this machine's address (the Host check's default)."""
    return TestClient(app, base_url="http://127.0.0.1", **kw)


def new_session(client) -> str:
    r = client.post("/api/sessions")
    assert r.status_code == 201
    return r.json()["session_id"]


def chat(client, sid, message=PROMPT, **kw) -> list[dict]:
    body = {"message": message, "max_new_tokens": 16, **kw}
    r = client.post(f"/api/sessions/{sid}/chat", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    return sse_events(r.text)


def test_info_reports_what_the_atlas_provides(client):
    info = client.get("/api/info").json()
    assert info["capabilities"] == {"atlas": True, "stats": True, "descriptions": HAVE_DESCRIBE}
    assert info["chat_template"] is False and "plain continuation" in info["chat_mode"]
    assert any("descriptions" in n for n in info["notes"]) != HAVE_DESCRIBE
    assert info["model"]["n_layers"] == 5 and info["model"]["n_neurons"] == 172


def test_chat_streams_tokens_and_greedy_is_deterministic(client, subject):
    sid1, sid2 = new_session(client), new_session(client)
    ev1, ev2 = chat(client, sid1), chat(client, sid2)
    toks = [e for e in ev1 if e["type"] == "token"]
    assert len(toks) >= 2 and ev1[-1]["type"] == "done"
    text = "".join(e["text"] for e in toks)
    assert text == ev1[-1]["text"] == ev2[-1]["text"]  # temperature 0 is greedy: same text twice
    # the same as an independent greedy generation of the plain continuation
    ids = subject.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    new = subject.generate_ids(ids, max_new_tokens=16, temperature=0)
    assert [e["id"] for e in toks] == [t for t in new[0].tolist() if t != subject.tokenizer.eos_token_id][:len(toks)]
    state = client.get(f"/api/sessions/{sid1}").json()
    assert [m["role"] for m in state["messages"]] == ["user", "assistant"]
    assert state["messages"][1]["content"] == subject.decode(new[0])


def test_sampling_honours_temperature_and_seed(client):
    outs = []
    for seed in (1, 1, 2):
        sid = new_session(client)
        r = client.post(f"/api/sessions/{sid}/chat",
                        json={"message": PROMPT, "max_new_tokens": 24, "temperature": 1.5, "seed": seed,
                              "stream": False})
        assert r.status_code == 200
        outs.append(r.json()["text"])
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_tokens_have_top5_matching_the_logits(client, subject):
    sid = new_session(client)
    chat(client, sid)
    toks = client.get(f"/api/sessions/{sid}/tokens").json()["tokens"]
    ids = torch.tensor([[t["id"] for t in toks]])
    probs = torch.softmax(subject.logits(ids)[0].float(), -1)
    assert toks[0]["prob"] is None and toks[0]["top5"] == []
    for t in toks[1:]:  # the rivals of a token are what the model predicted at ITS position (from the logits before)
        top = t["top5"]
        p = probs[t["position"] - 1]
        assert len(top) == 5 and all(a["prob"] >= b["prob"] for a, b in zip(top, top[1:]))
        assert [a["id"] for a in top] == p.topk(5).indices.tolist()
        assert top[0]["prob"] == pytest.approx(float(p.max()), rel=1e-4)
        assert t["prob"] == pytest.approx(float(p[t["id"]]), rel=1e-4) and t["prob"] <= top[0]["prob"] + 1e-6
    assert toks[3]["prob"] == pytest.approx(float(probs[2, toks[3]["id"]]), rel=1e-4)
    assert "".join(t["text"] for t in toks if t["role"] == "user").strip() == PROMPT


def test_activation_view_is_normalised_and_filterable(client, subject, atlas_dir):
    from neuronscope.stats import NeuronStats
    sid = new_session(client)
    chat(client, sid, max_new_tokens=24)
    toks = client.get(f"/api/sessions/{sid}/tokens").json()["tokens"]
    T = len(toks)
    d = client.get(f"/api/sessions/{sid}/activations", params={"page_size": 1000}).json()
    assert d["mode"] == "normalised" and d["total"] == len(d["rows"]) > 0
    # independent: capture, normalise with the statistics, threshold at |x| > 1
    ids = torch.tensor([[t["id"] for t in toks]])
    cap = Capture()
    with intervene(subject, cap), torch.no_grad():
        subject.model(input_ids=ids)
    norm = NeuronStats.open(atlas_dir).normalise(cap.activations[:, 0])
    firing = {(l, t, i) for l, t, i in (norm.abs() > 1).nonzero().tolist()}
    got = {(r["layer"], f["position"], r["neuron"]) for r in d["rows"] for f in r["fires"]}
    assert got == firing
    for r in d["rows"]:
        for f in r["fires"]:
            assert abs(f["value"]) > 1 and (f["value"] > 0) == (r["polarity"] == "pos")
            assert f["value"] == pytest.approx(float(norm[r["layer"], f["position"], r["neuron"]]), rel=1e-4)
        assert len(r["top_tokens"]) == 5
    assert abs(d["rows"][0]["activation"]) >= abs(d["rows"][-1]["activation"])
    sums = [0.0] * T
    for l, t, i in firing:
        sums[t] += float(norm[l, t, i])
    assert d["token_sums"] == pytest.approx(sums, rel=1e-4, abs=1e-5)
    # a token range keeps only neurons firing there
    lo, hi = T - 6, T
    rng = client.get(f"/api/sessions/{sid}/activations", params={"start": lo, "end": hi, "page_size": 1000}).json()
    assert {(r["layer"], r["neuron"], r["polarity"]) for r in rng["rows"]} == \
        {(r["layer"], r["neuron"], r["polarity"]) for r in d["rows"]
         if any(lo <= f["position"] < hi for f in r["fires"])}
    # paging, sorting, text filter, polarity
    p1 = client.get(f"/api/sessions/{sid}/activations", params={"page_size": 2, "page": 1}).json()
    assert p1["rows"] == [{k: v for k, v in r.items()} for r in d["rows"][2:4]]
    by_layer = client.get(f"/api/sessions/{sid}/activations", params={"sort": "layer", "order": "asc",
                                                                     "page_size": 1000}).json()["rows"]
    assert [(r["layer"], r["neuron"]) for r in by_layer] == sorted((r["layer"], r["neuron"]) for r in by_layer)
    one = d["rows"][0]
    f = client.get(f"/api/sessions/{sid}/activations",
                   params={"filter": f"L{one['layer']}/N{one['neuron']}", "page_size": 1000}).json()["rows"]
    assert f and all((r["layer"], r["neuron"]) == (one["layer"], one["neuron"]) for r in f)
    neg = client.get(f"/api/sessions/{sid}/activations", params={"polarity": "neg", "page_size": 1000}).json()
    assert all(r["polarity"] == "neg" for r in neg["rows"])


def test_attribution_matches_the_library_and_is_cached(client, monitor, subject):
    sid = new_session(client)
    chat(client, sid)
    toks = client.get(f"/api/sessions/{sid}/tokens").json()["tokens"]
    pos = len(toks) - 3
    d = client.get(f"/api/sessions/{sid}/attribution", params={"position": pos, "page_size": 1000}).json()
    assert d["total"] == 1000 and d["target_token"] == toks[pos]["id"]
    ref = attribute(subject, torch.tensor([[t["id"] for t in toks]]), pos, top=1000)
    assert d["probability"] == pytest.approx(ref.probability, rel=1e-5)
    assert [(r["layer"], r["position"], r["neuron"]) for r in d["rows"][:50]] == \
        [(r.layer, r.position, r.neuron) for r in ref.rows()[:50]]
    assert all(r["position"] < pos for r in d["rows"])
    assert sum(d["position_scores"]) == pytest.approx(float(ref.score.sum()), rel=1e-4)
    session = monitor.sessions.get(sid, client.cookies["ns_client"])
    cached = session.cache[("attr", pos, None)]
    again = client.get(f"/api/sessions/{sid}/attribution", params={"position": pos, "page": 1}).json()
    assert session.cache[("attr", pos, None)] is cached  # computed once for this conversation state
    assert again["rows"][0]["score"] == d["rows"][50]["score"]


def test_neuron_detail_has_decodes_exemplars_and_quantiles(client, atlas_dir):
    from neuronscope.atlas import Atlas
    d = client.get("/api/neurons/2/5", params={"n_exemplars": 3}).json()
    atlas = Atlas.open(atlas_dir)
    assert d["decodes_source"] == "atlas"
    assert [x["id"] for x in d["decodes"]["down.pos"]] == [x.id for x in atlas.neuron(2, 5)["down.pos"]]
    assert len(d["exemplars"]["pos"]) == 3
    ex = d["exemplars"]["pos"][0]
    assert len(ex["marks"]) == len(ex["tokens"]) and ex["marks"][ex["position"]] == pytest.approx(ex["normalised"],
                                                                                                 rel=1e-3)
    assert ex["normalised"] > 0 and d["quantiles"] and set(d["descriptions"]) == {"pos", "neg"}


def test_concept_search_and_clusters(client):
    d = client.get("/api/concepts", params={"q": "was", "k": 10}).json()
    assert 0 < len(d["results"]) <= 10
    from neuronscope.concepts.evidence import has_concept_evidence
    from neuronscope.describe.index import load_index
    folder = stories_atlas_dir(True)
    if has_concept_evidence(folder):  # grounded in activations: the same as the library's concept search, with sides
        from neuronscope.concepts import concept_search
        want = concept_search(folder, "was", k=10)
        assert [(r["layer"], r["neuron"], r["polarity"]) for r in d["results"]] == \
            [(h.layer, h.neuron, h.polarity) for h in want.hits]
        assert [r["source"] for r in d["results"]] == [h.side for h in want.hits]
    elif load_index(folder) is not None:  # by meaning: the same as the library's semantic search
        from neuronscope.concepts import semantic_search
        want_rows = semantic_search(folder, "was", k=10)
        assert [(r["layer"], r["neuron"], r["polarity"]) for r in d["results"]] == \
            [(r.layer, r.neuron, r.polarity) for r in want_rows]
        assert all(r["source"] == "semantic" for r in d["results"])
        assert all(a["score"] >= b["score"] for a, b in zip(d["results"], d["results"][1:]))
    else:
        assert all(r["source"].startswith("atlas") for r in d["results"])
    sid = new_session(client)
    chat(client, sid, max_new_tokens=32)
    c = client.get(f"/api/sessions/{sid}/clusters").json()
    assert c["n_neurons"] > 0
    for cl in c["clusters"]:
        assert cl["name"] and cl["kind"] in ("concept", "form", "unclear")
        assert len(cl["members"]) >= (1 if cl["kind"] == "unclear" else 2)
    assert sum(len(cl["members"]) for cl in c["clusters"]) <= c["n_neurons"]


def test_steering_changes_the_answer_and_can_be_removed(client, monitor, subject):
    sid = new_session(client)
    base = chat(client, sid, max_new_tokens=20)[-1]["text"]
    # strengthen = q(1 - 1e-7) x strength, per neuron
    st = client.post(f"/api/sessions/{sid}/steerings",
                     json={"mode": "strengthen", "neurons": [[4, 16], [3, 64]], "strength": 1.0}).json()
    q = monitor.knowledge.stats.quantile(1 - 1e-7)
    assert [n["value"] for n in st["neurons"]] == pytest.approx([float(q[4, 16]), float(q[3, 64])], rel=1e-6)
    client.delete(f"/api/sessions/{sid}/steerings/{st['id']}")
    st = client.post(f"/api/sessions/{sid}/steerings",
                     json={"mode": "clamp", "value": 8.0, "neurons": [[1, 2], [3, 4], [4, 16]]}).json()
    assert st["n_neurons"] == 3 and st["generated"] is True
    r = client.post(f"/api/sessions/{sid}/regenerate", json={"max_new_tokens": 20, "stream": False}).json()
    assert r["steered"] and r["text"] != base
    # the same as generating with the clamps directly
    ids = subject.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with intervene(subject, Clamp(1, [2], positions="generated", value=8.0), Clamp(3, [4], positions="generated",
                                                                                    value=8.0),
                   Clamp(4, [16], positions="generated", value=8.0)):
        new = subject.generate_ids(ids, max_new_tokens=20)
    assert r["text"] == subject.decode(new[0])
    toks = client.get(f"/api/sessions/{sid}/tokens").json()["tokens"]
    assert all(t["steered"] == (t["role"] == "assistant") for t in toks)
    assert [s["id"] for s in client.get(f"/api/sessions/{sid}/steerings").json()] == [st["id"]]
    assert client.delete(f"/api/sessions/{sid}/steerings/{st['id']}").json() == {"ok": True}
    assert client.get(f"/api/sessions/{sid}/steerings").json() == []
    r = client.post(f"/api/sessions/{sid}/regenerate", json={"max_new_tokens": 20, "stream": False}).json()
    assert r["text"] == base and not r["steered"]


def test_steering_a_concept_on_a_prompt_range(client):
    sid = new_session(client)
    chat(client, sid, max_new_tokens=8)
    st = client.post(f"/api/sessions/{sid}/steerings",
                     json={"mode": "suppress", "concept": "was", "n_neurons": 30, "ranges": [[1, 4]],
                           "generated": False}).json()
    assert st["n_neurons"] == 30 and all(n["value"] == 0.0 for n in st["neurons"])
    toks = client.get(f"/api/sessions/{sid}/tokens").json()["tokens"]
    assert [t["position"] for t in toks if t["steered"]] == [1, 2, 3]


BAD = [
    ("post", "chat", {"message": ""}),
    ("post", "chat", {"message": "x" * 5000}),
    ("post", "chat", {"message": "hi", "max_new_tokens": 0}),
    ("post", "chat", {"message": "hi", "max_new_tokens": 100000}),
    ("post", "chat", {"message": "hi", "temperature": -1}),
    ("post", "chat", b'{"message": "hi", "temperature": Infinity}'),
    ("post", "chat", b'{"message": "hi", "temperature": NaN}'),
    ("post", "steerings", b'{"mode": "strengthen", "neurons": [[0, 1]], "strength": NaN}'),
    ("post", "chat", {"message": "hi", "max_new_tokens": "many"}),
    ("post", "regenerate", {}),
    ("post", "steerings", {"mode": "clamp", "neurons": [[5, 0]], "value": 1}),
    ("post", "steerings", {"mode": "clamp", "neurons": [[0, 172]], "value": 1}),
    ("post", "steerings", {"mode": "clamp", "neurons": [[-1, 3]], "value": 1}),
    ("post", "steerings", {"mode": "clamp", "neurons": [[0, 1]]}),
    ("post", "steerings", {"mode": "clamp", "neurons": [[0, 1]], "value": 1e9}),
    ("post", "steerings", {"mode": "strengthen", "neurons": [[0, 1]], "strength": 50}),
    ("post", "steerings", {"mode": "suppress", "neurons": [[0, 1]], "ranges": [[0, 999]]}),
    ("post", "steerings", {"mode": "suppress", "neurons": [[0, 1]], "ranges": [[3, 2]]}),
    ("post", "steerings", {"mode": "suppress", "neurons": [[0, 1]], "generated": False}),
    ("post", "steerings", {"mode": "suppress"}),
    ("post", "steerings", {"mode": "explode", "neurons": [[0, 1]]}),
    ("get", "attribution?position=0", None),
    ("get", "attribution?position=99999", None),
    ("get", "attribution?position=2&token_id=512", None),
    ("get", "activations?start=5&end=3", None),
    ("get", "activations?sort=nonsense", None),
    ("delete", "steerings/nope", None),
]


@pytest.mark.parametrize("method,path,body", BAD)
def test_bad_input_is_a_clear_4xx_json_error(client, method, path, body):
    sid = new_session(client)
    url = f"/api/sessions/{sid}/{path}"
    if isinstance(body, bytes):
        r = client.request(method.upper(), url, content=body, headers={"content-type": "application/json"})
    else:
        r = client.request(method.upper(), url, json=body) if body is not None else client.request(method.upper(), url)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    err = r.json()["error"]
    assert isinstance(err, str) and len(err) > 10
    assert client.get(f"/api/sessions/{sid}").json()["messages"] == []  # nothing half-done left behind


def test_other_bad_inputs(client):
    assert client.get("/api/sessions/nope/tokens").status_code == 404
    assert "expired" in client.get("/api/sessions/nope").json()["error"]
    assert client.get("/api/neurons/5/0").status_code == 400
    assert client.get("/api/neurons/0/172").json()["error"].startswith("Neuron 172 is out of range")
    from neuronscope.describe.index import load_index
    semantic = load_index(stories_atlas_dir(True)) is not None  # by meaning there is always a nearest neuron
    assert client.get("/api/concepts", params={"q": "zzqqxx"}).status_code == (200 if semantic else 400)
    r = client.post("/api/sessions/x/chat", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "error" in r.json()


def test_conversation_length_is_capped(subject, atlas_dir):
    mon = Monitor(subject, Knowledge.load(subject, atlas_dir), limits=Limits(max_tokens=40))
    c = Client(create_app(mon))
    sid = new_session(c)
    r = c.post(f"/api/sessions/{sid}/chat", json={"message": PROMPT, "max_new_tokens": 40})
    assert r.status_code == 400 and "limit of 40" in r.json()["error"]
    assert c.get(f"/api/sessions/{sid}").json()["messages"] == []


def test_sessions_share_the_model_safely_and_do_not_leak(client, subject):
    prompts = ["Once upon a time", "The cat sat", "Lily had a big red ball", "Tom and Sue went"]
    expected = {}
    for p in prompts:
        ids = subject.tokenizer(p, return_tensors="pt")["input_ids"]
        expected[p] = subject.decode(subject.generate_ids(ids, max_new_tokens=16)[0])
    sids = {p: new_session(client) for p in prompts}
    results, errors = {}, []

    def run(p):
        try:
            c = Client(client.app, cookies=dict(client.cookies))
            ev = sse_events(c.post(f"/api/sessions/{sids[p]}/chat",
                                   json={"message": p, "max_new_tokens": 16}).text)
            att = c.get(f"/api/sessions/{sids[p]}/attribution", params={"position": 3}).json()
            results[p] = (ev[-1]["text"], att["total"])
        except Exception as exc:  # surfaced below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(p,)) for p in prompts for _ in range(1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for p in prompts:
        assert results[p][0] == expected[p]  # concurrent sessions = sequential runs
        state = client.get(f"/api/sessions/{sids[p]}").json()
        assert [m["content"] for m in state["messages"]] == [p, expected[p]]  # nothing from other sessions


def test_idle_sessions_expire(subject):
    now = [0.0]
    store = SessionStore(ttl=60, max_sessions=3, clock=lambda: now[0])
    c = Client(create_app(Monitor(subject, sessions=store)))
    a = new_session(c)
    now[0] = 30
    b = new_session(c)
    now[0] = 75  # a idle for 75 s: gone; b idle for 45 s: kept
    assert c.get(f"/api/sessions/{a}").status_code == 404
    assert c.get(f"/api/sessions/{b}").status_code == 200
    for _ in range(4):  # the cap evicts the least recently used
        new_session(c)
    assert len(store) == 3 and c.get(f"/api/sessions/{b}").status_code == 404


def test_without_statistics_the_views_degrade_clearly(subject):
    from neuronscope.atlas import build_atlas
    import tempfile
    folder = tempfile.mkdtemp(prefix="ns-atlas-nostats-")
    build_atlas(subject, folder, progress=False)
    c = Client(create_app(Monitor(subject, Knowledge.load(subject, folder))))
    info = c.get("/api/info").json()
    assert info["capabilities"]["stats"] is False and any("statistics" in n for n in info["notes"])
    sid = new_session(c)
    chat(c, sid)
    d = c.get(f"/api/sessions/{sid}/activations").json()
    assert d["mode"] == "raw" and "no corpus statistics" in d["notes"][0] and d["total"] > 0
    r = c.post(f"/api/sessions/{sid}/steerings", json={"mode": "strengthen", "neurons": [[0, 1]]})
    assert r.status_code == 400 and "statistics" in r.json()["error"]
    n = c.get("/api/neurons/0/1").json()
    assert n["exemplars"] == {"pos": [], "neg": []} and n["quantiles"] is None
    assert c.get(f"/api/sessions/{sid}/attribution", params={"position": 3}).json()["rows"][0]["normalised"] is None


def test_page_is_served(client):
    r = client.get("/")
    assert r.status_code == 200 and "neuronscope" in r.text and "/static/app.js" in r.text
    assert client.get("/static/app.js").status_code == 200
    assert "/api/sessions/{sid}/attribution" in client.get("/openapi.json").json()["paths"]


def test_cli_serve_prints_the_url_and_serves(atlas_dir):
    import subprocess
    import sys

    import httpx

    from tests.conftest import STORIES
    proc = subprocess.Popen([sys.executable, "-m", "neuronscope", "serve", str(STORIES), "--atlas", atlas_dir,
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, printed = wait_for_url(proc, 60)
        assert url, printed
        info = httpx.get(url + "api/info", timeout=10).json()
        assert info["capabilities"]["stats"] is True and info["model"]["n_layers"] == 5
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    bad = subprocess.run([sys.executable, "-m", "neuronscope", "serve", str(STORIES), "--atlas", "/nonexistent/atlas"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "error: No atlas folder" in bad.stderr


def test_without_an_atlas_decodes_come_from_the_weights(subject):
    c = Client(create_app(Monitor(subject)))
    d = c.get("/api/neurons/3/7", params={"n_exemplars": 0}).json()
    assert d["decodes_source"] == "model" and d["exemplars"] == {"pos": [], "neg": []}
    spec, m = subject.spec, subject.model
    logits = spec.unembedding(m) @ (spec.write_vectors(m, 3)[7] * spec.final_norm_gain(m))
    assert [x["id"] for x in d["decodes"]["down.pos"]] == logits.topk(5).indices.tolist()
    assert [x["id"] for x in d["decodes"]["down.neg"]] == (-logits).topk(5).indices.tolist()
    assert set(d["decodes"]) == {"down.pos", "down.neg", "up", "gate"}
    assert c.get("/api/concepts", params={"q": "dog"}).status_code == 400


def test_without_an_atlas_many_neurons_decode_in_one_batch_as_one_by_one(subject):
    """The batched top tokens (what a filtered activation page or a cluster view asks for) equal one neuron's decode
    through the LM head, and the views that use them agree with it."""
    from neuronscope.errors import NeuronscopeError
    k = Knowledge.load(subject, None)
    keys = [(layer, n, pol) for layer in (0, 3, 4) for n in (1, 17, 171) for pol in ("pos", "neg")]
    many = k.top_tokens_many(keys + keys[:3], k=5)
    assert list(many) == keys                                    # each neuron once, in the order asked
    one = {key: [d.token for d in k.decodes(key[0], key[1])[0][f"down.{key[2]}"]] for key in keys}  # one neuron each
    assert all(many[key] == one[key] for key in keys)
    assert many[(3, 17, "pos")] != many[(3, 17, "neg")]
    with pytest.raises(NeuronscopeError):
        k.top_tokens_many([(9, 0, "pos")])
    with pytest.raises(NeuronscopeError):
        k.top_tokens_many([(0, 172, "pos")])
    mon = Monitor(subject, k)
    s = mon.sessions.create()
    for _ in mon.send(s, PROMPT, max_new_tokens=4):
        pass
    rows = mon.activations(s, page_size=20).rows
    assert rows and all(r.top_tokens == k.top_tokens(r.layer, r.neuron, r.polarity) for r in rows)
    word = rows[0].top_tokens[0].strip().lower() or "l0/"
    whole = mon.activations(s, page_size=1000)
    every = whole.rows
    assert whole.total == len(every)                             # one page holds every firing neuron
    found = mon.activations(s, page_size=1000, filter=word).rows
    hay = {(r.layer, r.neuron, r.polarity): f"l{r.layer}/n{r.neuron} {r.layer}:{r.neuron} {' '.join(r.top_tokens)} "
           f"{r.polarity}".lower() for r in every}
    assert found and {(r.layer, r.neuron, r.polarity) for r in found} == {key for key, h in hay.items() if word in h}


def test_answers_stream_over_http_token_by_token(monitor):
    import httpx

    from tests.test_server_support import LiveServer
    with LiveServer(create_app(monitor)) as srv, httpx.Client(timeout=60) as http:  # keeps the client cookie
        sid = http.post(srv.url + "/api/sessions").json()["session_id"]
        chunks = []
        with http.stream("POST", f"{srv.url}/api/sessions/{sid}/chat",
                         json={"message": PROMPT, "max_new_tokens": 40}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for chunk in r.iter_raw():
                chunks.append(chunk)
    events = sse_events(b"".join(chunks).decode())
    assert events[-1]["type"] == "done" and events[-1]["n_tokens"] >= 10
    assert len(chunks) > 1  # the events left the server one by one, not as one body at the end


@pytest.mark.skipif(not HAVE_DESCRIBE, reason="the describe package (issue 5) is not in this build")
def test_descriptions_show_in_the_views_and_the_concept_search(client, atlas_dir):
    from neuronscope.describe import Descriptions
    D = Descriptions.open(atlas_dir)
    d = client.get("/api/neurons/2/5", params={"n_exemplars": 0}).json()
    assert d["descriptions"]["pos"] == D.get(2, 5, "pos").text
    o = client.get("/api/neurons/2/5/outputs").json()["outputs"]     # output effects on demand, both polarities
    from neuronscope.describe.effects import measure_effects
    from neuronscope.stats import NeuronStats
    lib = measure_effects(client.app.state.monitor.runtime.subject, NeuronStats.open(atlas_dir), [(2, 5, "pos")])
    assert o["pos"] is not None
    assert [x["delta"] for x in o["pos"]["says"]] == pytest.approx(lib[(2, 5, "pos")].says_delta, abs=1e-3)
    assert set(o) == {"pos", "neg"} and client.get("/api/neurons/2/99999/outputs").status_code == 400
    kinds = d["description_kinds"]["pos"]           # the neuron view shows every kind with its scores
    assert [c["source"] for c in kinds] == [c.source for c in D.get(2, 5, "pos", candidates=True).candidates]
    assert any(c["source"] == "label" and c["score"] is not None and c["detection"] is not None for c in kinds)
    sid = new_session(client)
    chat(client, sid, max_new_tokens=24)
    rows = client.get(f"/api/sessions/{sid}/activations", params={"page_size": 1000}).json()["rows"]
    for r in rows:
        want = D.get(r["layer"], r["neuron"], r["polarity"])
        assert r["description"] == (want.text if want else None)
    word = "promotes"  # in every label; no token of the 512-token vocabulary spells it
    got = client.get("/api/concepts", params={"q": word, "k": 200}).json()
    found = got["results"]
    if not found:        # grounded in activations: the corpus never shows the word, and the notes say so
        assert "no text about 'promotes'" in got["notes"][0]
    elif found[0]["source"] in ("semantic", "reads", "writes"):  # each row carries its neuron's description
        assert all(r["description"] == getattr(D.get(r["layer"], r["neuron"], r["polarity"]), "text", None)
                   for r in found)
    else:
        from_desc = [r for r in found if r["source"] == "description"]
        assert from_desc and all(word in r["description"] for r in from_desc)


@pytest.mark.slow
def test_chat_template_model_smollm2(smollm):
    mon = Monitor(smollm)
    c = Client(create_app(mon))
    sid = new_session(c)
    q = "What is the capital of France?"
    ev = sse_events(c.post(f"/api/sessions/{sid}/chat", json={"message": q, "max_new_tokens": 8}).text)
    assert ev[-1]["type"] == "done"
    assert ev[-1]["text"] == smollm.generate(q, chat=True, max_new_tokens=8)  # through the chat template, greedy
    state = c.get(f"/api/sessions/{sid}").json()
    user, answer = state["messages"]
    toks = c.get(f"/api/sessions/{sid}/tokens").json()["tokens"]
    assert "".join(t["text"] for t in toks[user["start"]:user["end"]]).count(q) == 1
    # the message's own tokens are "user"; the template and the default system prompt around them are "template"
    assert "".join(t["text"] for t in toks if t["role"] == "user").strip() == q
    system = "".join(t["text"] for t in toks[:user["end"]] if t["role"] == "template")
    assert "<|im_start|>" in system and (len(system) > 40 or "system" not in system)
    content = c.get(f"/api/sessions/{sid}/activations", params={"content_only": True, "page_size": 1000}).json()
    assert all(toks[f["position"]]["role"] in ("user", "assistant") for r in content["rows"] for f in r["fires"]
               if f["position"] == r["position"])
    span = toks[answer["start"]:answer["end"]]
    n_own = sum(t["role"] == "assistant" for t in span)  # the answer's own tokens, then the end-of-turn template
    assert [t["role"] for t in span] == ["assistant"] * n_own + ["template"] * (len(span) - n_own)
    assert "".join(t["text"] for t in span[:n_own]).strip() == ev[-1]["text"].strip()
    assert all(t["role"] == "template" for t in span[n_own:]) and "<|im_end|>" in "".join(t["text"] for t in span)
    assert "".join(t["text"] for t in toks[answer["start"]:answer["end"]]).startswith(ev[-1]["text"])
    assert toks[0]["role"] in ("user", "template")
    ids = smollm.encode(q, chat=True)[0].tolist()
    assert [t["id"] for t in toks[:len(ids)]] == ids  # the prompt the model answered is the start of the state
    att = c.get(f"/api/sessions/{sid}/attribution", params={"position": answer["start"] + 1}).json()
    assert att["total"] == 1000 and att["target_token"] == toks[answer["start"] + 1]["id"]
    act = c.get(f"/api/sessions/{sid}/activations").json()
    assert act["mode"] == "raw" and act["total"] > 0
