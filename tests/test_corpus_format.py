"""WikiText read as the text it stands for (issue 18): markup undone, headings as plain lines, one article a
document, found by name or content, recorded with the run's settings; on files written here and on the real
wiki.valid.raw."""
from __future__ import annotations

import json
import random
import re
import sqlite3
from pathlib import Path

import pytest
from conftest import CORPORA, STORIES, run_cli

from neuronscope.errors import NeuronscopeError
from neuronscope.stats import NeuronStats, checkpoint, compute_stats, merge_shards
from neuronscope.stats import compute as compute_mod
from neuronscope.stats.corpus import file_format, iter_documents, iter_windows
from neuronscope.stats.wikitext import clean_line, documents, heading, looks_like_wikitext

WIKI_VALID = CORPORA / "wikitext-2-raw" / "wiki.valid.raw"
TINY = CORPORA / "tinystories-sample" / "tinystories_sample.txt"
WINDOW = 32
# what WikiText markup looks like in any text: a joiner, a space before punctuation, inside brackets, a heading
MARKUP = re.compile(r"@[-,.]@| [,.;:!?](?= |$)|\( | \)|(?m:^ *(?:= )+\S.*(?: =)+ *$)")

CASES = [
    (" It weighs 1 @,@ 200 kg ( 2 @,@ 600 lb ) . ", "It weighs 1,200 kg (2,600 lb)."),
    (" 1 @,@ 467 @,@ 220 views ; born in 1932 @,@ ", "1,467,220 views; born in 1932,"),
    (" a role @-@ playing game , released in 2 @.@ 5 versions . ", "a role-playing game, released in 2.5 versions."),
    (' the larger one is the " crusher " , and the other the " cutter " . ',
     'the larger one is the "crusher", and the other the "cutter".'),
    (" I don 't know ; the lobster 's claws and the players ' union . ",
     "I don't know; the lobster's claws and the players' union."),
    (" in the ' 70s a place called ' Robies Noust ' : $ 5 million , 50 % of it . ",
     "in the '70s a place called 'Robies Noust': $5 million, 50% of it."),
    (" the 360 ° Tour ; 5 – 6 kilograms ( 11 – 13 lb ) , he said ! ",
     "the 360° Tour; 5–6 kilograms (11–13 lb), he said!"),
    (" Siyah K 'ak ' appears — in words — as [ 1 ] . ", "Siyah K 'ak ' appears — in words — as [1]."),   # left alone
]


def test_a_line_of_wikitext_reads_as_the_text_it_stands_for():
    for raw, clean in CASES:
        assert clean_line(raw) == clean
    assert heading(" = = Description = = \r\n") == (2, "Description")
    assert heading(" = Homarus gammarus = ") == (1, "Homarus gammarus")
    assert heading(" = = = Taxonomy = = = ") == (3, "Taxonomy")
    assert heading(" = Qualified for the next round ") is None     # a table legend in wiki.valid.raw, no heading
    assert heading(" = = Unbalanced = ") is None
    assert clean_line("Plain text, as it is (no markup).") == "Plain text, as it is (no markup)."


def wiki_article(rng: random.Random, title: str) -> list[str]:
    """One article in WikiText's raw form (CRLF, a space before and after each line, spaced punctuation)."""
    things = ["lobster", "island", "highway", "song", "ship", "castle"]
    lines = ["", f" = {title} = ", ""]
    for sec in ("Description", "History"):
        lines += [f" = = {sec} = = ", ""]
        for _ in range(rng.randint(2, 4)):
            t = rng.choice(things)
            lines.append(f" The {t} is {rng.randint(2, 9)} @.@ {rng.randint(1, 9)} km ( {rng.randint(1, 9)} @,@ "
                         f"{rng.randint(100, 999)} ft ) long , and its " + '" north @-@ east " side is '
                         f"{rng.choice(['old', 'new', 'steep'])} . It was n't built by the {t} 's owners . ")
        lines.append("")
        lines += [" = = = Notes = = = ", "", f" A {rng.choice(things)} @-@ like shape ; see [ 1 ] . ", ""]
    return lines


@pytest.fixture(scope="module")
def wiki_file(tmp_path_factory) -> Path:
    """A WikiText-like file of our own: a line before the first article, then 24 articles."""
    rng = random.Random(3)
    lines = [" A preamble line , before any heading . "]
    for n in range(24):
        lines += wiki_article(rng, f"Article {n} @-@ {rng.choice(['North', 'South'])}")
    path = tmp_path_factory.mktemp("wiki") / "wiki.small.raw"
    path.write_bytes("\r\n".join(lines).encode("utf-8") + b"\r\n")
    return path


def test_articles_are_documents_headings_plain_lines(wiki_file):
    docs = list(iter_documents(wiki_file))
    assert len(docs) == 1 + 24                            # the preamble, then one document per article
    assert docs[0] == "A preamble line, before any heading."
    first = docs[1].split("\n")
    assert first[0] == "Article 0-North" or first[0] == "Article 0-South"
    assert first[1] == "Description" and "Notes" in first and "History" in first
    assert all("\r" not in d and not MARKUP.search(d) for d in docs), [d for d in docs if MARKUP.search(d)][:1]
    assert re.match(r"The \w+ is \d\.\d km \(\d,\d{3} ft\) long, and its \"north-east\" side is \w+\. It wasn't "
                    r"built by the \w+'s owners\.$", first[2]), first[2]
    # the same file read as plain text keeps the markup and splits on blank lines (every heading a document)
    plain = list(iter_documents(wiki_file, "plain"))
    assert len(plain) > 5 * len(docs) and any("@-@" in d for d in plain)
    assert list(documents(wiki_file.read_text(encoding="utf-8").splitlines())) == docs


def test_wikitext_is_found_by_name_or_content_and_nothing_else(wiki_file, tmp_path):
    assert file_format(wiki_file) == "wikitext"                      # by name (and content)
    renamed = tmp_path / "notes.txt"
    renamed.write_bytes(wiki_file.read_bytes())
    assert file_format(renamed) == "wikitext"                        # by content alone
    assert list(iter_documents(renamed)) == list(iter_documents(wiki_file))
    named = tmp_path / "wiki.mine.tokens"
    named.write_text("Ordinary text, as written.\n\nA second paragraph.\n", encoding="utf-8")
    assert file_format(named) == "wikitext"                          # the name is enough
    asciidoc = tmp_path / "guide.adoc"
    asciidoc.write_text("= User Guide =\n\nThis guide, in plain words, explains it.\n", encoding="utf-8")
    spaced = tmp_path / "tokens.txt"
    spaced.write_text("a tokenised line , with spaced punctuation .\n", encoding="utf-8")
    for p in (asciidoc, spaced):
        assert file_format(p) == "plain", p
        assert list(iter_documents(p)) == list(iter_documents(p, "plain"))
    assert file_format(TINY) == "plain" and file_format(asciidoc, "wikitext") == "wikitext"
    assert file_format(wiki_file, "plain") == "plain"
    with pytest.raises(NeuronscopeError, match="corpus format is one of auto, plain, wikitext"):
        file_format(wiki_file, "markdown")


def test_wikitext_as_records_one_line_a_row(wiki_file, tmp_path):
    """The Hugging Face form of WikiText: one row per line, in a text field; chat records are not WikiText."""
    rows = tmp_path / "wikitext-rows.jsonl"
    with open(rows, "w", encoding="utf-8") as f:
        for line in wiki_file.read_text(encoding="utf-8").splitlines():
            f.write(json.dumps({"text": line + "\n"}) + "\n")
    assert file_format(rows) == "wikitext"
    assert list(iter_documents(rows)) == list(iter_documents(wiki_file))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n", encoding="utf-8")
    assert file_format(chat) == "plain"
    with pytest.raises(NeuronscopeError, match="chat records, which are not WikiText"):
        list(iter_documents(chat, "wikitext"))


def test_the_real_wiki_valid_reads_as_articles_without_markup():
    raw = WIKI_VALID.read_text(encoding="utf-8")
    assert "@-@" in raw and " , " in raw                             # the file does carry the markup
    docs = iter_documents(WIKI_VALID)
    first = [next(docs) for _ in range(12)]
    assert [d.split("\n")[0] for d in first[:4]] == ["Homarus gammarus", "Frank Headlam", "M-82 (Michigan highway)",
                                                     "Shikamaru Nara"]
    assert first[0].split("\n")[1].startswith("Homarus gammarus, known as the European lobster or common lobster, "
                                              "is a species of clawed lobster")
    assert "\nDescription\n" in first[0]
    # one document per article (as many as the file has top-level headings), none with markup left
    n_articles = sum(1 for line in raw.splitlines() if heading(line) is not None and heading(line)[0] == 1)
    every = first + list(docs)
    assert n_articles == 60 and len(every) == n_articles
    for d in every:
        assert not MARKUP.search(d), MARKUP.search(d)
    assert looks_like_wikitext(raw.splitlines())


def stored_texts(tokenizer, folder: Path) -> list[str]:
    """Every stored exemplar window, decoded by the tokenizer (its text, spaces and all)."""
    con = sqlite3.connect(folder / "atlas.sqlite")
    try:
        rows = con.execute("SELECT token_ids FROM stats_windows").fetchall()
    finally:
        con.close()
    return [tokenizer.decode(json.loads(r[0])) for r in rows]


def test_exemplars_carry_no_markup_and_the_format_is_a_setting(stories, wiki_file, tmp_path, monkeypatch):
    opts = dict(window=WINDOW, n_exemplars=6, batch=4, progress=False)
    st = compute_stats(stories, wiki_file, tmp_path / "clean", **opts)
    info = st.info
    assert info["corpus_format"] == "auto" and [c["format"] for c in info["corpus"]] == ["wikitext"]
    texts = stored_texts(stories.tokenizer, tmp_path / "clean")
    assert len(texts) > 10 and not any(MARKUP.search(t) for t in texts)
    for layer in range(stories.n_layers):
        for ex in st.exemplars(layer, 0, "pos", n=6) + st.exemplars(layer, 1, "neg", n=6):
            assert "@" not in ex.text and "= =" not in ex.text, ex.text
    # the same file read as plain text: the stored windows do carry the markup
    raw = compute_stats(stories, wiki_file, tmp_path / "raw", corpus_format="plain", **opts)
    assert raw.info["corpus_format"] == "plain" and raw.info["corpus"][0]["format"] == "plain"
    assert any(MARKUP.search(t) for t in stored_texts(stories.tokenizer, tmp_path / "raw"))
    # a run interrupted under one format is not resumed under another
    folder = tmp_path / "resume"

    def stop(batch_no):
        if batch_no == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(compute_mod, "_after_batch", stop)
    with pytest.raises(KeyboardInterrupt):
        compute_stats(stories, wiki_file, folder, checkpoint_every=0, **opts)
    monkeypatch.setattr(compute_mod, "_after_batch", lambda b: None)
    assert checkpoint.exists(folder)
    with pytest.raises(NeuronscopeError, match="other settings"):
        compute_stats(stories, wiki_file, folder, corpus_format="plain", **opts)
    resumed = compute_stats(stories, wiki_file, folder, corpus_format="auto", **opts)
    assert resumed.tokens == st.tokens
    assert resumed.exemplars(1, 3, "pos", n=6) == st.exemplars(1, 3, "pos", n=6)
    with pytest.raises(NeuronscopeError, match="corpus format is one of"):
        compute_stats(stories, wiki_file, tmp_path / "bad", corpus_format="wiki", **opts)


def test_shards_read_in_different_formats_do_not_merge(stories, wiki_file, tmp_path):
    opts = dict(window=WINDOW, n_exemplars=4, batch=4, progress=False, k=8)
    compute_stats(stories, wiki_file, tmp_path / "a", shard="0/2", **opts)
    compute_stats(stories, wiki_file, tmp_path / "b", shard="1/2", corpus_format="plain", **opts)
    with pytest.raises(NeuronscopeError, match="differs"):
        merge_shards([tmp_path / "a", tmp_path / "b"], tmp_path / "m")


def test_stats_on_the_real_wiki_valid_stores_clean_windows(stories, tmp_path):
    folder = tmp_path / "wiki"
    st = compute_stats(stories, WIKI_VALID, folder, tokens=64 * WINDOW, window=WINDOW, n_exemplars=8, batch=16,
                       progress=False)
    assert st.info["corpus"][0]["format"] == "wikitext" and st.tokens == 64 * WINDOW
    texts = stored_texts(stories.tokenizer, folder)
    assert texts and not any(MARKUP.search(t) for t in texts), [t for t in texts if MARKUP.search(t)][:1]
    stream = stories.tokenizer.decode([i for w in iter_windows(stories.tokenizer, [WIKI_VALID], WINDOW, max_windows=64)
                                       for i in w.token_ids])
    assert "Homarus gammarus, known as the European lobster" in stream
    assert NeuronStats.open(folder).info["corpus_format"] == "auto"


def test_the_cli_option(capsys, tmp_path, wiki_file):
    code, out, err = run_cli(capsys, "stats", STORIES, "--corpus", wiki_file, "--atlas", tmp_path / "x",
                             "--corpus-format", "markdown")
    assert code == 2 and "corpus format is one of auto, plain, wikitext" in err
    code, out, err = run_cli(capsys, "stats", "--help")
    assert code == 0 and "--corpus-format" in out and "plain lines" in " ".join(out.split())
