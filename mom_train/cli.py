"""`mom-train` command line (also `python -m mom_train`).

    mom-train train --config configs/quickstart.yaml [section.key=value ...] [--dry-run]
    mom-train eval --checkpoint RUN_OR_CHECKPOINT_DIR [section.key=value ...]
    mom-train generate --checkpoint RUN_OR_CHECKPOINT_DIR --prompt "..." [--max-new-tokens N ...]
    mom-train plot RUN_DIR
    mom-train export --checkpoint RUN_OR_CHECKPOINT_DIR --out HF_DIR [--format fla|llama]
    mom-train import --hf HF_DIR --out RUN_DIR [--config FILE] [section.key=value ...]
    mom-train lm-eval --checkpoint RUN_OR_CHECKPOINT_DIR --tasks TASK[,TASK...] [--batch-size N] [--limit N]

Heavy modules (torch models, data, wandb) are imported inside the subcommands so `--help` stays fast.
`main` is the one error boundary: an expected failure (config, input, checkpoint, data, disk, permissions)
ends with one or two lines naming the problem and the fix and exit code 2 (3 for a fault during training
after the last good state was saved); a traceback is printed only with `--debug`.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable

from mom_train import __version__
from mom_train.config import Config, ConfigError, load_config, to_yaml
from mom_train.errors import UserError, describe_os_error


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", "-c", required=required, metavar="FILE", help="experiment YAML file")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. training.lr=1e-3 run.name=try2")


def _format_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def describe_model(cfg: Config) -> str:
    """Parameter counts and FLOPs per token, computed on the meta device (no memory, no weights)."""
    from mom_train.model import count_parameters, flops_per_token

    counts = count_parameters(cfg.model)
    flops = flops_per_token(cfg.model, cfg.training.seq_len)
    return "\n".join([
        f"model: {cfg.model.arch}",
        f"  parameters total:      {counts['total']:>15,d} ({_format_count(counts['total'])})",
        f"  parameters embedding:  {counts['embedding']:>15,d} ({_format_count(counts['embedding'])})",
        f"  active per token:      {counts['active_per_token']:>15,d} ({_format_count(counts['active_per_token'])})",
        f"  training FLOPs/token:  {flops:>15.4g} (seq_len {cfg.training.seq_len})",
    ])


def describe_layout(cfg: Config, world_size: int) -> str:
    """The rank layout (dp x cp x tp) and what one rank holds of the model."""
    import torch

    from mom_train.model import build_model, count_parameters
    from mom_train.parallel.dims import check_layout
    from mom_train.parallel.memory import describe_memory
    from mom_train.parallel.tensor import local_parameter_count

    p = cfg.parallel
    check_layout(cfg, world_size)
    dp = world_size // (p.tp * p.cp)
    lines = [f"layout: {world_size} rank(s) = dp {dp} x cp {p.cp} x tp {p.tp}"
             + (" (sequence parallel)" if p.tp > 1 and p.sequence_parallel else "")]
    total = count_parameters(cfg.model)["total"]
    local = total
    if p.tp > 1:
        with torch.device("meta"):
            model = build_model(cfg.model)
        local = local_parameter_count(model, p.tp)
        lines.append(f"  parameters per rank:   {local:>15,d} ({_format_count(local)} of {_format_count(total)}: "
                     "heads and MLP split over tp; embedding, norms and router whole)")
    if p.cp > 1:
        lines.append(f"  each micro-batch split over {p.cp} context-parallel ranks "
                     f"({cfg.training.micro_batch_size * cfg.training.seq_len // p.cp} tokens per rank)")
    lines.append("  " + describe_memory(cfg, world_size, local))
    return "\n".join(lines)


def dry_run_warnings(cfg: Config) -> list[str]:
    """What would stop the real run on this machine, though the config itself is valid."""
    import torch

    warnings = []
    on_cpu = cfg.run.device == "cpu" or not torch.cuda.is_available()
    if cfg.training.cuda_graphs and on_cpu:
        warnings.append("`training.cuda_graphs` = true needs a CUDA device and this machine has none, so the run "
                        "would stop; set training.cuda_graphs=false to train here")
    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        warnings.append("`run.device` = 'cuda' but CUDA is not available here; use run.device=auto or cpu")
    return warnings


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print("# resolved config")
        print(to_yaml(cfg), end="")
        print(describe_model(cfg))
        world = _world_size()
        print(describe_layout(cfg, world))
        dp = max(1, world // (cfg.parallel.tp * cfg.parallel.cp))
        print(f"batch: {cfg.global_batch_sequences(dp)} sequences x {cfg.training.seq_len} tokens per step, "
              f"{cfg.grad_accum_steps(dp)} micro-batch(es) of {cfg.training.micro_batch_size} per data-parallel "
              f"rank, dp={dp}")
        print(f"run dir: {cfg.run.path}")
        for warning in dry_run_warnings(cfg):
            print(f"warning: {warning}", file=sys.stderr)
        return 0
    from mom_train.train import train

    train(cfg)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from mom_train.eval import run_eval

    print(json.dumps(run_eval(args.checkpoint, args.overrides)))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from mom_train.eval import generate_from_checkpoint

    print(generate_from_checkpoint(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature,
                                   args.top_p, args.top_k, args.seed, args.overrides))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from mom_train.metrics import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from mom_train.hf import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, args.format, args.dtype, not args.no_tokenizer,
                            args.overrides)
    print(f"exported to {out}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from mom_train.hf import import_hf

    imported = import_hf(args.hf, args.out, args.config, args.overrides)
    run_dir = imported.config.run.path
    for note in imported.notes:
        print(f"note: {note}")
    print(f"imported {args.hf} into {imported.checkpoint} (weights only: no optimizer, schedule or data state).\n"
          f"train on: mom-train train --config {run_dir / 'config.yaml'}   (fresh optimizer, LR schedule from "
          f"step 0)\nevaluate: mom-train eval --checkpoint {run_dir}")
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    import json

    from mom_train.eval.lm_eval import run_lm_eval

    tasks = [t for t in args.tasks.split(",") if t]
    out = run_lm_eval(args.checkpoint, tasks, args.batch_size, args.limit, args.num_fewshot, args.include_path,
                      args.max_length, args.bootstrap_iters, args.log_samples, args.seed, args.overrides)
    print(json.dumps({k: out[k] for k in ("checkpoint", "step", "results", "path")}))
    return 0


def _world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mom-train", description="Pretrain Mixture-of-Memories language models.")
    parser.add_argument("--version", action="version", version=f"mom-train {__version__}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of any failure")
    # --debug is accepted after the subcommand too; the subparsers' default must not reset the main one
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="print the traceback of any failure")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parser = lambda *a, **k: sub.add_parser(*a, parents=[debug], **k)  # noqa: E731

    p = add_parser("train", help="train a model from a YAML config (torchrun for several GPUs)")
    _add_config_args(p)
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config, print it with the model size and FLOPs per token, and exit")
    p.set_defaults(func=cmd_train)

    p = add_parser("eval", help="held-out loss/perplexity (text) or recall accuracy (MQAR) of a checkpoint")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint dir, or run dir (its latest)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. eval.num_batches=50")
    p.set_defaults(func=cmd_eval)

    p = add_parser("generate", help="sample a continuation of a prompt from a checkpoint")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint dir, or run dir (its latest)")
    p.add_argument("--prompt", required=True, help="text (MQAR checkpoints: space-separated token ids)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. run.device=cpu")
    p.set_defaults(func=cmd_generate)

    p = add_parser("plot", help="write loss/lr/throughput curves (PNG) of a run from its metrics.jsonl")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face model directory (fla or Llama classes)")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint dir, or run dir (its latest)")
    p.add_argument("--out", required=True, metavar="HF_DIR", help="directory to write (created if missing)")
    p.add_argument("--format", choices=["fla", "llama"], default=None,
                   help="fla: flash-linear-attention's classes (default for mom, gated_deltanet); llama: "
                        "transformers' LlamaForCausalLM (default for transformer)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="dtype of the weights")
    p.add_argument("--no-tokenizer", action="store_true", help="do not write the HF tokenizer files")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides of the checkpoint's config")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="turn a Hugging Face model directory (fla or Llama) into a run of ours")
    p.add_argument("--hf", required=True, metavar="HF_DIR", help="directory with config.json and safetensors")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to create")
    p.add_argument("--config", "-c", metavar="FILE",
                   help="YAML whose training/data settings the run takes (the model comes from config.json)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. training.lr=1e-4")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks on a checkpoint (our model, our tokenizer)")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint dir, or run dir (its latest)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--batch-size", type=int, default=8, help="requests packed into one forward")
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--include-path", default=None, metavar="DIR", help="directory of extra task YAML files")
    p.add_argument("--max-length", type=int, default=None, help="longest input (default: training.seq_len)")
    p.add_argument("--bootstrap-iters", type=int, default=100000, help="for stderr estimates (0: none)")
    p.add_argument("--log-samples", action="store_true", help="also write every request and response")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. run.device=cpu")
    p.set_defaults(func=cmd_lm_eval)
    return parser


def report(e: BaseException) -> int:
    """Print `e` as the one or two lines a user sees (stderr) and return the exit code."""
    if isinstance(e, ConfigError):
        label, message, code = "config error", str(e), 2
    elif isinstance(e, UserError):
        label, message, code = e.label, str(e), e.exit_code
    elif isinstance(e, OSError):
        label, message, code = "error", describe_os_error(e), 2
    else:
        # not an expected failure: a bug, or a case the checks above do not know yet
        label, message, code = "internal error", f"{type(e).__name__}: {e}", 1
        message += "\n  rerun with --debug for the traceback, and report it with the command you ran"
    print(f"mom-train: {label}: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - the error boundary: every failure ends here
        if args.debug:
            traceback.print_exc()
        return report(e)


if __name__ == "__main__":
    sys.exit(main())
