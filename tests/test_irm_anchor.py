"""The KL anchor (`irm train --kl`): zero for a zero IRM, equal to KL(frozen || IRM-on) over the scored positions
only (computed by hand), its gradient reaches the IRM and never the frozen model, and training with it keeps the
IRM-on distribution closer to the frozen one than training without it."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from neuronscope.irm.data import IGNORE, collate, kl_to_frozen, tokenize_rows
from neuronscope.irm.model import IRM
from neuronscope.irm.training import TrainConfig, _pad_id, irm_loss, train_irm

ROWS = [{"prompt": "Once upon a time", "response": " there was a little dog named Max."},
        {"prompt": "The girl went to the park", "response": " with her mom and saw a big tree."},
        {"prompt": "Tom had a big red ball", "response": ". He liked to play with it every day."}]


def _batch(stories):
    return collate(tokenize_rows(stories, ROWS), _pad_id(stories))


def _on_logits(stories, irm, batch):
    with torch.no_grad(), irm.attached(stories):
        return stories.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_kl_anchor_zero_for_zero_irm_and_by_hand(stories):
    stories.model.requires_grad_(False)
    batch = _batch(stories)
    irm = IRM.for_subject(stories, "all")                     # fresh: last layer zero, output zero
    loss, lm = irm_loss(stories, irm, batch, kl=5.0)
    assert float(loss.detach()) == float(lm.detach())
    torch.manual_seed(0)
    torch.nn.init.normal_(irm.net[-1].weight, std=0.5)
    with torch.no_grad():
        frozen = stories.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    on = _on_logits(stories, irm, batch)
    got = float(kl_to_frozen(frozen, on, batch["labels"]))
    terms = []
    for b in range(on.shape[0]):
        for t in range(on.shape[1] - 1):
            if batch["labels"][b, t + 1] != IGNORE:
                lq, lp = F.log_softmax(frozen[b, t], -1), F.log_softmax(on[b, t], -1)
                terms.append(float((lq.exp() * (lq - lp)).sum()))
    assert got > 1e-3 and abs(got - sum(terms) / len(terms)) < 1e-5
    # positions with no target do not count: changing the logits there leaves the anchor unchanged
    prompt_pos = (batch["labels"][:, 1:] == IGNORE)
    moved = on.clone()
    moved[:, :-1][prompt_pos] += 3.0 * torch.randn_like(moved[:, :-1][prompt_pos])
    assert abs(float(kl_to_frozen(frozen, moved, batch["labels"])) - got) < 1e-6


def test_kl_anchor_gradient_reaches_only_the_irm(stories):
    stories.model.requires_grad_(False)
    batch = _batch(stories)
    irm = IRM.for_subject(stories, "all")
    torch.manual_seed(1)
    torch.nn.init.normal_(irm.net[-1].weight, std=0.5)
    loss, lm = irm_loss(stories, irm, batch, kl=1.0)
    (loss - lm).backward()                                    # the anchor term alone
    grads = [p.grad for p in irm.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in stories.model.parameters())


def test_training_with_the_anchor_stays_closer_to_the_frozen_model(stories, tmp_path):
    rows = [{"prompt": "Once upon a time", "response": " the sad dog cried and cried."}] * 12
    batch = _batch(stories)
    with torch.no_grad():
        frozen = stories.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    kls = {}
    for w in (0.0, 5.0):
        cfg = TrainConfig(steps=30, batch_size=4, lr=1e-2, kl=w, val_fraction=0.0, eval_every=30, patience=0)
        res = train_irm(stories, rows, tmp_path / f"kl{w}", inject_layers="all", config=cfg, progress=False)
        kls[w] = float(kl_to_frozen(frozen, _on_logits(stories, res.irm, batch), batch["labels"]))
    assert kls[5.0] < 0.7 * kls[0.0], kls
