"""The Injectable Realignment Model (Smith et al. 2024, arXiv 2407.03621) on the intervention core: a small MLP
that reads the residual stream of a frozen LLM and writes one vector per injected layer back into it.

    from neuronscope.irm import IRM, train_irm, TrainConfig, evaluate_irm, generate_side_by_side, analyze_runs
"""
from .model import IRM, IRMConfig
from .data import read_table, tokenize_rows, lm_loss, collate, split, read_texts
from .training import TrainConfig, TrainResult, train_irm, load_run, validation_loss
from .generation import generate_side_by_side, generate_texts
from .evaluation import evaluate_irm, held_out_rows
from .analysis import analyze_runs, striation
from .synth import synthesize, read_questions

__all__ = ["IRM", "IRMConfig", "TrainConfig", "TrainResult", "train_irm", "load_run", "validation_loss",
           "generate_side_by_side", "generate_texts", "evaluate_irm", "held_out_rows", "analyze_runs", "striation",
           "read_table", "tokenize_rows", "lm_loss", "collate", "split", "read_texts", "synthesize",
           "read_questions"]
