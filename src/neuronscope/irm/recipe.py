"""The realigning recipe (issue 13, `examples/irm-smollm-sad.sh`): the settings `irm train` and `irm sweep` use by
default, because they are the ones measured to realign SmolLM2-135M-Instruct (sadness x23 at eval scale 0.7, p 1e-4,
repetition within 1.5x; docs/irm.md).

Data: `data select --mode frame` rows (the model's own greedy answers framed by emotional sentences), trained with the
chat template when the rows were built with it. Training: every layer injected, width 256, depth 1, 60 steps of 4
rows, Adam lr 1e-3, 192 tokens, validation every 10 steps, stop after 3 validations without improvement, best IRM by
validation loss. Evaluation: 40 held-out questions, greedy, 48 new tokens, IRM output scaled by 0.7 (the dose).

    cfg = recipe_config(seed=0, chat=True)        # a TrainConfig
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

from .training import TrainConfig

LAYERS = "all"
WIDTH = 256
DEPTH = 1
TRAIN = TrainConfig(steps=60, batch_size=4, lr=1e-3, max_len=192, val_fraction=0.1, eval_every=10, patience=3,
                    chat=True)
EVAL_SCALE = 0.7
EVAL_LIMIT = 40
EVAL_MAX_NEW_TOKENS = 48
SCRIPT = "examples/irm-smollm-sad.sh"


def recipe_config(*, seed: int = 0, chat: bool = True) -> TrainConfig:
    """The recipe's TrainConfig with a seed and the chat choice (the rows' own)."""
    return replace(TRAIN, seed=seed, chat=chat).validate()


def resolve_chat(rows: Sequence[Mapping[str, Any]], subject: Any) -> bool:
    """The chat choice when none is given: the rows' own `chat` field (frame rows record how they were built), else
    whether the model has a chat template."""
    marks = {r.get("chat") for r in rows}
    if len(marks) == 1 and isinstance(next(iter(marks)), bool):
        return bool(next(iter(marks)))
    return bool(getattr(subject, "has_chat_template", False))


__all__ = ["LAYERS", "WIDTH", "DEPTH", "TRAIN", "EVAL_SCALE", "EVAL_LIMIT", "EVAL_MAX_NEW_TOKENS", "SCRIPT",
           "recipe_config", "resolve_chat"]
