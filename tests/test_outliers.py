"""`model_outliers` finds a planted massive dimension and the down_proj weight that writes it; the CLI prints it."""
from __future__ import annotations

import copy

import torch

from neuronscope.cli import main
from neuronscope.outliers import model_outliers
from tests.conftest import STORIES


def _planted(stories, h=17, j=40, layer=1, gain=300.0):
    from neuronscope.subject import Subject
    model = copy.deepcopy(stories.model)
    W = stories.spec.layer_part(model, layer, stories.spec.down).weight      # [H, neurons]
    with torch.no_grad():
        W[h, j] = W[h].abs().max() * gain
    return Subject.from_model(model, stories.tokenizer, name="stories260k-planted")


def test_planted_massive_dim_and_super_weight(stories):
    s = _planted(stories)
    rep = model_outliers(s, factor=10.0, k=5, progress=False)
    top = rep.massive.dims[0]
    assert top.dim == 17 and top.max_multiple >= 10 and 1 in top.layers
    assert rep.rankings["massive_activations"].indices[0] == 17
    sw = rep.super_weight_candidates[0]
    assert (sw.layer, sw.dim, sw.neuron) == (1, 17, 40) and sw.multiple_of_median > 100
    base = model_outliers(stories, factor=10.0, k=5, progress=False)
    assert all(d.max_multiple < top.max_multiple / 5 for d in base.massive.dims)
    assert base.rankings["lm_head_column_norm"].multiples[0] >= 1.0


def test_outliers_cli(capsys):
    try:
        main(["outliers", str(STORIES), "-k", "3"])
    except SystemExit as exc:
        assert not exc.code
    out = capsys.readouterr().out
    assert "Massive residual activations" in out and "lm head column norm" in out
    try:
        main(["outliers", str(STORIES), "--factor", "0.5"])
        code = 0
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "factor" in err
