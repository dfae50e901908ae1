"""The Injectable Realignment Model (Smith et al. 2024, arXiv 2407.03621) on the intervention core: a small MLP
that reads the residual stream of a frozen LLM and writes one vector per injected layer back into it.

    from neuronscope.irm import IRM, train_irm, TrainConfig, evaluate_irm, judge_irm, analyze_runs, run_sweep
"""
from .model import IRM, IRMConfig
from .data import read_table, tokenize_rows, lm_loss, collate, split, read_texts
from .training import TrainConfig, TrainResult, train_irm, load_run, validation_loss
from .generation import generate_side_by_side, generate_texts
from .evaluation import JudgedEval, LossEval, evaluate_irm, held_out_rows, judge_irm
from .analysis import Analysis, analyze_runs, striation
from .compare import MatchedComparison, Pair, matched_comparison
from .sweep import SweepResult, SweepRun, run_sweep, sweep_plan
from .synth import synthesize, read_questions

__all__ = ["IRM", "IRMConfig", "TrainConfig", "TrainResult", "train_irm", "load_run", "validation_loss",
           "generate_side_by_side", "generate_texts", "evaluate_irm", "held_out_rows", "analyze_runs", "striation",
           "read_table", "tokenize_rows", "lm_loss", "collate", "split", "read_texts", "synthesize",
           "read_questions", "judge_irm", "JudgedEval", "LossEval", "Analysis", "MatchedComparison", "Pair",
           "matched_comparison", "SweepResult", "SweepRun", "run_sweep", "sweep_plan"]
