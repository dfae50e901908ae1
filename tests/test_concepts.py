"""Concepts grounded in activations (issue 19): concept search says which neurons read a concept and which write it,
clusters are named by meaning, steering by concept clamps the writers and is compared with a random control. On the
tiny llama of test_describe_meaning.py (SmolLM2's tokenizer, a planted animal reader, a planted sea writer that acts
through a later layer) with real statistics, descriptions and the real all-MiniLM-L6-v2 embedder."""
from __future__ import annotations

import pytest
import torch

from test_describe_meaning import MINILM, READER, TOPIC, WRITER
from test_describe_meaning import meaning as meaning  # noqa: F401  (the module's fixture, shared)


@pytest.fixture(scope="module")
def emb():
    from neuronscope.embed import Embedder
    return Embedder(MINILM)


def _refs(res):
    return [(h.layer, h.neuron, h.polarity) for h in res.hits]


def test_search_finds_the_reader_of_a_field_by_a_synonym_on_the_reads_side(meaning, emb):
    """The planted animal reader is found by 'creatures' on the reads side. (The fixture scales the animal words'
    embeddings up, so a few other neurons of this tiny model also fire hardest on some animal words and rank beside
    it; a neuron that never fires on an animal word is not found at all.)"""
    from neuronscope.concepts import concept_search
    from neuronscope.concepts.search import open_evidence
    _, folder, _, animals, _ = meaning
    res = concept_search(folder, "creatures", side="reads", k=50, embedder=emb)
    refs = _refs(res)
    assert (0, TOPIC, "pos") in refs[:5], [(h.ref, h.reads, h.read_words) for h in res.hits]
    hit = res.hits[refs.index((0, TOPIC, "pos"))]
    assert hit.side == "reads" and len(hit.read_words) >= 4 and set(hit.read_words) <= set(animals)
    assert res.support.n_words >= 3                          # the corpus's animal words stand behind it
    assert all(h.side == "reads" for h in res.hits)
    ev, _ = open_evidence(folder, emb)
    code = {k: i for i, k in enumerate(ev.keys)}
    animal_codes = {code[w] for w in animals if w in code}
    blind = [ev.neuron(m) for m in range(ev.read_codes.shape[0])
             if not animal_codes & set(ev.read_codes[m].tolist())]
    assert blind and not set(blind) & set(refs)             # neurons that never fire on an animal word: not found


def test_search_finds_the_writer_whose_effect_is_causal_on_the_writes_side(meaning, emb):
    from neuronscope.concepts import concept_search
    _, folder, *_ = meaning
    res = concept_search(folder, "the ocean", side="writes", k=10, embedder=emb)
    refs = _refs(res)
    assert (0, WRITER, "pos") in refs[:5], [(h.ref, h.writes, h.write_words, h.measured) for h in res.hits]
    hit = res.hits[refs.index((0, WRITER, "pos"))]
    assert hit.side == "writes" and hit.measured and hit.writes >= 0.25
    assert set(hit.write_words) & {"sea", "boat", "wave"}
    both = concept_search(folder, "the ocean", side="both", k=10, embedder=emb)
    assert {h.side for h in both.hits} <= {"reads", "writes"}
    assert (0, WRITER, "pos") in _refs(both)
    d = both.to_dict()
    assert d["hits"][0]["ref"] and d["support"]["n_words"] >= 1


def test_search_refuses_a_concept_the_corpus_never_showed(meaning, emb):
    from neuronscope.concepts import concept_search
    from neuronscope.errors import NeuronscopeError
    _, folder, *_ = meaning
    with pytest.raises(NeuronscopeError, match="no text about"):
        concept_search(folder, "quantum chromodynamics", embedder=emb)
    with pytest.raises(NeuronscopeError, match="side"):
        concept_search(folder, "animals", side="sideways", embedder=emb)


def test_clusters_keep_a_planted_group_whole_and_name_it_by_its_field(meaning, emb):
    """The planted writer and its later-layer reader both write the sea words: one cluster, named by a sea topic.
    (In this fixture the sea words' unembedding rows are scaled up, so some random neurons' decodes also promote
    them and may join; the planted pair must not be split.) The animal reader reads an animal topic."""
    import torch as T
    from neuronscope.concepts import concept_clusters
    from neuronscope.concepts.clusters import topic_shares
    from neuronscope.concepts.search import open_evidence
    _, folder, *_ = meaning
    others = [(0, n, "pos") for n in range(20) if n not in (TOPIC, WRITER)]
    groups = concept_clusters(folder, [(0, WRITER, "pos"), (1, READER, "pos"), (0, TOPIC, "pos")] + others,
                              min_size=1, embedder=emb)
    where = {tuple(m): g for g in groups for m in g.members}
    sea = where[(0, WRITER, "pos")]
    assert (1, READER, "pos") in [tuple(m) for m in sea.members], [(g.name, g.members) for g in groups]
    assert sea.kind == "concept" and sea.writes is not None
    assert any(w in sea.writes for w in ("sea", "ocean", "boat", "wave", "sail", "fish")), sea.writes
    assert set(sea.tokens) & {"sea", "boat", "wave"}
    assert all(g.kind in ("concept", "form", "unclear") for g in groups)
    assert sum(g.size for g in groups) == len(others) + 3                 # every neuron in exactly one group
    ev, _ = open_evidence(folder, emb)
    reads, _ = topic_shares(ev, T.tensor([ev.row(0, TOPIC, "pos")]))
    topic = ev.terms[int(reads[0].argmax())]
    assert any(w in topic for w in ("animal", "wildlife", "pet", "farm", "bird", "fish")), topic


def test_steering_by_concept_clamps_writers_and_beats_a_random_control(meaning, emb):
    """The writers of 'the ocean' raise the sea words' probability more than as many random neurons of the same
    layers and polarities clamped the same way."""
    from neuronscope.atlas.folder import AtlasFolder
    from neuronscope.concepts import concept_neurons, random_control, steer_interventions
    from neuronscope.interventions import intervene
    from neuronscope.stats.results import NeuronStats
    subject, folder, _, _, sea = meaning
    writers = concept_neurons(folder, "the ocean", k=5, embedder=emb)
    assert (0, WRITER, "pos") in writers
    stats = NeuronStats.from_folder(AtlasFolder.open(folder))
    control = random_control(stats, writers, seed=0)
    assert len(control) == len(writers) and not set(control) & set(writers)
    assert sorted((l, p) for l, _, p in control) == sorted((l, p) for l, _, p in writers)
    ids = subject.tokenizer("the man went to the old house and", return_tensors="pt")["input_ids"]
    sea_ids = torch.tensor(list(sea.values()))

    def sea_logprob(edits):
        with intervene(subject, *edits):
            logits = subject.logits(ids)[0, -1].float()
        return float(torch.logsumexp(torch.log_softmax(logits, -1)[sea_ids], 0))

    off = sea_logprob([])
    steered = sea_logprob(steer_interventions(stats, writers, 1.0))
    ctrl = sea_logprob(steer_interventions(stats, control, 1.0))
    assert steered > off + 1.0 and steered > ctrl + 1.0, (off, steered, ctrl)
