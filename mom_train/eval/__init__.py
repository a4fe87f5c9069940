"""Evaluation: held-out loss/perplexity (text), MQAR recall accuracy, and text generation from checkpoints;
lm-evaluation-harness tasks in `mom_train.eval.lm_eval` (imported on use: lm-eval is an optional extra)."""
from mom_train.eval.evaluate import EVAL_SEED_OFFSET, check_eval_data, evaluate, run_eval
from mom_train.eval.generate import generate_from_checkpoint

__all__ = ["EVAL_SEED_OFFSET", "check_eval_data", "evaluate", "generate_from_checkpoint", "run_eval"]
