"""Mutation smoke: plant known bugs one at a time in a scratch copy of the repository and check that the tests
meant to catch each one fail. A developer tool (a few minutes on a CPU); CI does not run it.

    python scripts/mutation_smoke.py            # every mutant
    python scripts/mutation_smoke.py --list     # names and targets
    python scripts/mutation_smoke.py router-aux-gradient-dropped loader-skips-record-after-mid-file-resume

The selected tests first run on the unchanged copy (they must pass), then once per mutant. Each line of the
report names the mutant, CAUGHT or SURVIVED, and the first failing assertion. Exit status 1 when a mutant
survives, its code no longer matches (the source moved: update the mutant), or the unchanged tests fail.
The working tree is never modified.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "runs", ".scratch", "*.egg-info", ".gpu-wheels",
                                ".whl")


@dataclass(frozen=True)
class Mutant:
    """Replace `old` (exactly one occurrence in `path`) by `new`; `tests` (pytest arguments) must fail."""
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


GRAD_ACCUM = ("tests/train/test_grad_accum.py",)
GENERATE = ("tests/model/test_lm.py", "-k", "top_k_top_p")
MUTANTS = [
    Mutant("ce-scaled-by-grad-accum", "mom_train/train.py",
           "ce_scale = dims.grad_size / max(global_valid, 1)",
           "ce_scale = dims.grad_size * grad_accum / max(global_valid, 1)", GRAD_ACCUM),
    Mutant("ce-not-scaled-by-ranks", "mom_train/train.py",
           "ce_scale = dims.grad_size / max(global_valid, 1)", "ce_scale = 1 / max(global_valid, 1)", GRAD_ACCUM),
    Mutant("aux-summed-over-micro-batches", "mom_train/train.py",
           "coef * dims.cp_size / grad_accum", "coef * dims.cp_size", GRAD_ACCUM),
    Mutant("loader-skips-record-after-mid-file-resume", "mom_train/data/loader.py",
           "reader.read(units[u], first_record if u == first_unit else 0)",
           "reader.read(units[u], first_record + (first_record > 0) if u == first_unit else 0)",
           ("tests/data/test_loader_resume.py",)),
    Mutant("router-aux-gradient-dropped", "mom_train/model/routing.py",
           "mean_prob = probs.sum(0) / denom", "mean_prob = probs.detach().sum(0) / denom",
           ("tests/model/test_routing.py", "-k", "fp64")),
    Mutant("router-weights-normaliser-detached", "mom_train/model/routing.py",
           "topk_weight = top_p / top_p.sum(-1, keepdim=True)",
           "topk_weight = top_p / top_p.sum(-1, keepdim=True).detach()", ("tests/model/test_routing.py", "-k", "fp64")),
    Mutant("recall-marks-every-answer-right", "mom_train/data/mqar.py",
           "return ((pred == target) & mask).sum(), mask.sum()", "return mask.sum(), mask.sum()",
           ("tests/data/test_mqar.py", "tests/train/test_metrics_eval.py")),
    Mutant("recall-compares-unshifted", "mom_train/data/mqar.py",
           "pred = logits[:, :-1].argmax(dim=-1)", "pred = logits[:, 1:].argmax(dim=-1)",
           ("tests/data/test_mqar.py", "tests/train/test_metrics_eval.py")),
    Mutant("eval-reads-the-training-stream", "mom_train/eval/evaluate.py",
           'split="eval", seed_offset=EVAL_SEED_OFFSET)', 'split="train")',
           ("tests/train/test_metrics_eval.py",)),
    Mutant("recompute-hooks-under-no-grad", "mom_train/model/recompute.py",
           "if not torch.is_grad_enabled():", "if False:", ("tests/model/test_recompute.py",)),
    Mutant("mlp-rounded-to-128", "mom_train/config.py",
           "return 256 * math.ceil(size / 256)", "return 128 * math.ceil(size / 128)",
           ("tests/model/test_mom.py", "-k", "parameter_count")),
    Mutant("sampling-ignores-top-k", "mom_train/model/lm.py", "if top_k > 0:", "if False:", GENERATE),
    Mutant("sampling-top-p-drops-the-crossing-token", "mom_train/model/lm.py",
           "drop = probs.cumsum(-1) - probs >= top_p", "drop = probs.cumsum(-1) >= top_p", GENERATE),
    Mutant("sampling-ignores-temperature", "mom_train/model/lm.py",
           "logits = logits.float() / temperature", "logits = logits.float()", GENERATE),
]


def run_tests(copy: Path, tests: tuple[str, ...]) -> tuple[bool, str]:
    """(passed, first failure line) of pytest over `tests` in the scratch copy."""
    env = dict(os.environ, PYTHONPATH=str(copy))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests], cwd=copy,
                          env=env, capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    first = next((line[1:].strip() for line in lines if line.startswith("E ")), lines[-1] if lines else "")
    return proc.returncode == 0, first[:160]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args()
    unknown = set(args.names) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutants {sorted(unknown)}; see --list")
    mutants = [m for m in MUTANTS if not args.names or m.name in args.names]
    if args.list:
        for m in mutants:
            print(f"{m.name}: {m.path} -> {' '.join(m.tests)}")
        return 0

    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=IGNORE)
        for tests in dict.fromkeys(m.tests for m in mutants):
            passed, first = run_tests(copy, tests)
            if not passed:
                print(f"unchanged code fails {' '.join(tests)}: {first}")
                return 1
        print("unchanged code passes every selected test", flush=True)
        for m in mutants:
            path = copy / m.path
            source = path.read_text()
            if source.count(m.old) != 1:
                print(f"{m.name}: NOT APPLIED ({m.old!r} occurs {source.count(m.old)} times in {m.path})")
                ok = False
                continue
            path.write_text(source.replace(m.old, m.new))
            try:
                passed, first = run_tests(copy, m.tests)
            finally:
                path.write_text(source)
            print(f"{m.name}: {'SURVIVED' if passed else 'CAUGHT'}{'' if passed else ' | ' + first}", flush=True)
            ok &= not passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
