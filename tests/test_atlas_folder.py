"""AtlasFolder: one owner of the folder. A user's folder is never touched, damaged files are one sentence naming the
file, the Monitor starts without a damaged part (and says so), and `--layers` builds part of an atlas."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from neuronscope.atlas import Atlas, build_atlas
from neuronscope.atlas.folder import DB, MANIFEST, PARTS_DIR, AtlasFolder, site_file
from neuronscope.errors import NeuronscopeError
from neuronscope.server import Knowledge
from conftest import STORIES, run_cli as run, wait_for_url


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(stories, tmp_path_factory):
    return build_atlas(stories, tmp_path_factory.mktemp("af") / "stories", progress=False)


def _copy(built, tmp_path, name="copy"):
    dest = tmp_path / name
    shutil.copytree(built.folder, dest)
    return dest


# ---- never touch a user's files --------------------------------------------------------------------------------
def test_build_refuses_a_users_folder_and_leaves_it_as_it_was(stories, capsys, tmp_path):
    """The issue's reproduction: `mkdir -p U/parts; echo x > U/parts/chapter1.tex; atlas build MODEL -o U`."""
    user = tmp_path / "U"
    (user / "parts").mkdir(parents=True)
    (user / "parts" / "chapter1.tex").write_text("x\n")
    (user / MANIFEST).write_text('{"title": "my thesis", "chapters": 3}\n')   # an unrelated manifest.json
    before = _tree(user)
    for extra in ([], ["--overwrite"]):
        code, out, err = run(capsys, "atlas", "build", STORIES, "-o", user, "-q", *extra)
        assert code == 2 and err.startswith("error:") and "not a neuronscope atlas" in err
        assert len(err.strip().splitlines()) == 1
        assert _tree(user) == before                                # the user's files, byte for byte
    (user / MANIFEST).unlink()                                      # also without any manifest
    with pytest.raises(NeuronscopeError, match="did not write"):
        build_atlas(stories, user, progress=False)
    assert (user / "parts" / "chapter1.tex").read_text() == "x\n"


def test_an_atlas_of_the_same_model_keeps_the_users_files(stories, built, tmp_path):
    folder = _copy(built, tmp_path)
    (folder / "notes.txt").write_text("mine")
    (folder / PARTS_DIR).mkdir()
    (folder / PARTS_DIR / "keep.me").write_text("also mine")
    again = build_atlas(stories, folder, progress=False)                        # same options: nothing to do
    again = build_atlas(stories, folder, top_k=4, overwrite=True, progress=False)   # a rebuild
    assert again.top_k == 4
    assert (folder / "notes.txt").read_text() == "mine"
    assert (folder / PARTS_DIR / "keep.me").read_text() == "also mine"          # build deletes only its own parts
    assert not list((folder / PARTS_DIR).glob("layer_*"))


def test_stats_refuses_a_users_folder(stories, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "data.csv").write_text("a,b\n")
    with pytest.raises(NeuronscopeError, match="not a neuronscope atlas"):
        AtlasFolder.open(user, create=True).claim(stories)
    assert sorted(p.name for p in user.iterdir()) == ["data.csv"]


# ---- damaged files: one sentence that names the file and the fix -----------------------------------------------
def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garble(path):
    path.write_bytes(b"\x00garbage\xff" * 64)


@pytest.mark.parametrize("damage", [_truncate, _garble])
def test_damaged_site_file(built, tmp_path, capsys, damage):
    folder = _copy(built, tmp_path)
    damage(site_file(folder, "up"))
    with pytest.raises(NeuronscopeError, match="atlas_up.safetensors.*damaged.*--overwrite"):
        Atlas.open(folder)
    for cmd in (["atlas", "show", folder, "3:17"], ["atlas", "search", folder, "dog", "--tokens-only"]):
        code, out, err = run(capsys, *cmd)
        assert code == 2 and err.startswith("error:") and "atlas_up.safetensors" in err, (cmd, err)
        assert "Traceback" not in err


@pytest.mark.parametrize("damage", [_truncate, _garble])
def test_damaged_database(built, tmp_path, capsys, damage):
    folder = _copy(built, tmp_path)
    for extra in ("-wal", "-shm"):
        (folder / (DB + extra)).unlink(missing_ok=True)
    damage(folder / DB)
    with pytest.raises(NeuronscopeError, match="atlas.sqlite.*(damaged|cannot be opened)"):
        Atlas.open(folder)
    code, out, err = run(capsys, "atlas", "show", folder, "3:17")
    assert code == 2 and "atlas.sqlite" in err and "Traceback" not in err


def test_damaged_manifest(built, tmp_path, capsys):
    folder = _copy(built, tmp_path)
    (folder / MANIFEST).write_text('{"atlas": {"status": "comp')
    with pytest.raises(NeuronscopeError, match="manifest.json.*damaged"):
        AtlasFolder.open(folder)
    code, out, err = run(capsys, "atlas", "show", folder, "3:17")
    assert code == 2 and "manifest.json" in err and "damaged" in err
    # serve refuses to start on it: one error line, exit status 2 (before listening)
    code, out, err = run(capsys, "serve", STORIES, "--atlas", folder, "--port", "0")
    assert code == 2 and err.startswith("error:") and "manifest.json" in err and "Traceback" not in err


def test_monitor_starts_without_a_damaged_part_and_says_so(stories, built, tmp_path):
    folder = _copy(built, tmp_path)
    _truncate(site_file(folder, "down.pos"))
    k = Knowledge.load(stories, folder)
    assert k.atlas is None and any("atlas_down.pos.safetensors" in n and "damaged" in n for n in k.notes)
    decodes, source = k.decodes(3, 17)          # still answers, from the weights
    assert source == "model" and len(decodes["down.pos"]) == 5
    ref = built.neuron(3, 17)["down.pos"][:5]
    assert [r.id for r in decodes["down.pos"]] == [r.id for r in ref]
    assert decodes["down.pos"][0].prob == pytest.approx(ref[0].prob, rel=1e-4)


def test_newer_format_is_refused(built, tmp_path):
    folder = _copy(built, tmp_path)
    man = json.loads((folder / MANIFEST).read_text())
    man["format"]["version"] = 99
    (folder / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(NeuronscopeError, match="version 99.*upgrade"):
        Atlas.open(folder)


def test_version1_folder_without_format_section_still_opens(built, tmp_path):
    folder = _copy(built, tmp_path)
    man = json.loads((folder / MANIFEST).read_text())
    del man["format"]
    (folder / MANIFEST).write_text(json.dumps(man))
    assert Atlas.open(folder).n_layers == built.n_layers


# ---- part of an atlas: --layers -------------------------------------------------------------------------------
def test_build_some_layers(stories, built, tmp_path, capsys):
    code, out, err = run(capsys, "atlas", "build", STORIES, "-o", tmp_path / "some", "--layers", "1,3", "-q")
    assert code == 0, err
    part = Atlas.open(tmp_path / "some")
    assert part.layers == [1, 3] and part.n_layers == built.n_layers
    for site in built.sites:
        for layer in (1, 3):
            assert torch.equal(part.top_ids(site)[layer], built.top_ids(site)[layer])
    with pytest.raises(NeuronscopeError, match="Layer 0 is not in this atlas.*1,3"):
        part.neuron(0, 5)
    code, out, err = run(capsys, "atlas", "show", tmp_path / "some", "2:5")
    assert code == 2 and "not in this atlas" in err
    assert part.top_neurons_for(built.vocab[int(built.top_ids("up")[1, 0, 0])])   # search sees built layers only
    assert all(r.layer in (1, 3) for r in part.top_neurons_for(built.vocab[int(built.top_ids("up")[1, 0, 0])]))


def test_compare_does_not_replace_a_users_files(built, tmp_path):
    from neuronscope.atlas import compare_atlases
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "compare.json").write_text('{"my": "own file"}')
    (out / "agreement.png").write_bytes(b"my picture")
    before = _tree(out)
    with pytest.raises(NeuronscopeError, match="not an earlier comparison"):
        compare_atlases(built, built, out_dir=out)
    assert _tree(out) == before
    fresh = tmp_path / "fresh"
    compare_atlases(built, built, out_dir=fresh)
    assert compare_atlases(built, built, out_dir=fresh).top1_agreement == 1.0   # its own files: replaced


def test_ctrl_c_during_a_build_saves_the_finished_layers_and_resumes(stories, built, tmp_path, monkeypatch, capsys):
    import os
    import signal

    from neuronscope.atlas import build as build_mod
    real = build_mod._decode_layer
    seen = []

    def interrupted_at_1(subject, layer, *a, **kw):
        seen.append(layer)
        if layer == 1:
            os.kill(os.getpid(), signal.SIGINT)      # as a user's Ctrl-C during layer 1
        return real(subject, layer, *a, **kw)
    monkeypatch.setattr(build_mod, "_decode_layer", interrupted_at_1)
    code, out, err = run(capsys, "atlas", "build", STORIES, "-o", tmp_path / "a", "-q")
    assert code == 130 and "stopped after layer 1" in err and "run the same command again" in err
    assert seen == [0, 1] and sorted(p.name for p in (tmp_path / "a" / PARTS_DIR).iterdir()) == \
        ["layer_000.safetensors", "layer_001.safetensors"]
    monkeypatch.setattr(build_mod, "_decode_layer", real)
    again = build_atlas(stories, tmp_path / "a", progress=False)
    assert torch.equal(again.top_ids("down.pos"), built.top_ids("down.pos"))


def test_damaged_statistics_and_embeddings_parts(tmp_path):
    """A folder with statistics and descriptions: a truncated stats.safetensors or neuron_emb.safetensors leaves
    the Monitor without that part and a note naming the file; the atlas part still opens."""
    from tests.test_server_support import _stories, stories_atlas_dir
    subject = _stories()
    src = stories_atlas_dir(True)
    for name in ("stats.safetensors", "neuron_emb.safetensors"):
        folder = tmp_path / name
        shutil.copytree(src, folder)
        if not (folder / name).exists():
            pytest.skip(f"this build writes no {name}")
        _truncate(folder / name)
        k = Knowledge.load(subject, folder)
        assert k.atlas is not None
        assert any(name in n and "damaged" in n for n in k.notes), (name, k.notes)
        if name == "stats.safetensors":
            assert k.stats is None and k.normalise(torch.zeros(1)) is None
        else:
            assert k.descriptions is None and k.stats is not None


def test_serve_starts_without_a_damaged_part_and_says_so(built, tmp_path):
    """`neuronscope serve --atlas DIR` with a truncated atlas file: it prints a note naming the file, listens, and
    answers a neuron request from the weights (200, not 500)."""
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request
    folder = _copy(built, tmp_path)
    _truncate(site_file(folder, "up"))
    proc = subprocess.Popen([sys.executable, "-c", "from neuronscope.cli import main; main()", "serve", str(STORIES),
                             "--atlas", str(folder), "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**__import__("os").environ, "COLUMNS": "300"})
    try:
        url, out = wait_for_url(proc, 120)
        assert url, out
        assert "note:" in out and "atlas_up.safetensors" in out and "damaged" in out, out
        body = None
        for _ in range(50):
            try:
                with urllib.request.urlopen(url + "api/neurons/3/17?n_exemplars=0", timeout=10) as r:
                    body = json.loads(r.read())
                break
            except urllib.error.HTTPError:
                raise
            except OSError:
                time.sleep(0.2)
        assert body is not None and body["decodes_source"] == "model" and len(body["decodes"]["down.pos"]) == 5
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_an_unfinished_build_of_the_old_layout_is_migrated_and_resumed(stories, built, tmp_path, monkeypatch):
    """Version-1 builds kept their parts in parts/: the next build moves only its layer files and resumes."""
    from neuronscope.atlas import build as build_mod
    folder = tmp_path / "old"
    real = build_mod._decode_layer

    def dying(subject, layer, *a, **kw):
        if layer == 2:
            raise KeyboardInterrupt
        return real(subject, layer, *a, **kw)
    monkeypatch.setattr(build_mod, "_decode_layer", dying)
    with pytest.raises(KeyboardInterrupt):
        build_atlas(stories, folder, progress=False)
    # make it look like the old layout: no format section, parts in parts/, plus a file of the user's there
    man = json.loads((folder / MANIFEST).read_text())
    del man["format"]
    (folder / MANIFEST).write_text(json.dumps(man))
    (folder / PARTS_DIR).rename(folder / "parts")
    (folder / "parts" / "notes.txt").write_text("mine")
    calls = []

    def counting(subject, layer, *a, **kw):
        calls.append(layer)
        return real(subject, layer, *a, **kw)
    monkeypatch.setattr(build_mod, "_decode_layer", counting)
    done = build_atlas(stories, folder, progress=False)
    assert calls == [2, 3, 4]                                   # layers 0 and 1 were taken over from parts/
    assert torch.equal(done.top_ids("up"), built.top_ids("up"))
    assert (folder / "parts" / "notes.txt").read_text() == "mine" and len(list((folder / "parts").iterdir())) == 1
    assert json.loads((folder / MANIFEST).read_text())["format"]["version"] == 1
