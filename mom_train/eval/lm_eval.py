"""lm-evaluation-harness on our own model (`mom-train lm-eval`), not through a Hugging Face export.

`MomLM` is an `lm_eval` model: the run's sentencepiece tokenizer with its BOS policy (a context starts with BOS
when the run trained with data.add_bos, as its documents did), and
- loglikelihood: requests sorted by length and packed `batch_size` at a time into one row with cu_seqlens
  (documents stay apart, no padding); each continuation scored from the log-softmax at the positions before
  its tokens; inputs longer than max_length keep their last max_length tokens;
- loglikelihood_rolling: the document's tokens after BOS (the prefix token), in windows of max_length, each
  scored like a loglikelihood request (lm-eval's rolling windows);
- generate_until: greedy (or sampled, with gen_kwargs do_sample and temperature > 0, top_p, top_k) on the
  recurrent cache: a batch of contexts prefilled packed, then one token per step for every row (Transformer++
  decodes one request at a time on its KV cache); a row stops at EOS, at a stop string or after max_gen_toks
  tokens.

`run_lm_eval` scores a checkpoint, writes the results JSON into the run directory (`lm_eval/step_XXXXXXX.json`)
and logs the metrics to metrics.jsonl (and wandb when the run logs to it) like any evaluation.
"""
from __future__ import annotations

import itertools
import json
import os
from typing import Any

import torch

from mom_train.config import Config, ConfigError

try:
    from lm_eval.api.model import TemplateLM
except ImportError:
    raise ConfigError("mom-train lm-eval needs lm-evaluation-harness: pip install lm-eval "
                      "(or pip install -e '.[eval]')") from None

from mom_train.checkpoint import checkpoint_config, load_model, resolve_checkpoint
from mom_train.data import Tokenizer, load_tokenizer
from mom_train.model.lm import CausalLM, sample_next_token
from mom_train.parallel.dims import ParallelDims, resolve_device
from mom_train.precision import autocast_context

# (context, continuation) strings, context tokens, continuation tokens: one loglikelihood request
TokenRequest = tuple[tuple[str | None, str | None], list[int], list[int]]


class MomLM(TemplateLM):
    """An lm-eval model over one of our CausalLMs (in eval mode) and its sentencepiece tokenizer."""

    def __init__(self, model: CausalLM, tokenizer: Tokenizer, add_bos: bool = True, precision: str = "auto",
                 batch_size: int = 8, max_length: int = 2048):
        super().__init__()
        if batch_size < 1 or max_length < 2:
            raise ConfigError(f"lm-eval: need batch_size >= 1 and max_length >= 2, got {batch_size}, {max_length}")
        self.model = model.eval()
        self.sp = tokenizer
        self.add_bos = add_bos
        self.precision = precision
        self.batch_size = batch_size
        self.max_length = max_length
        self._device = next(model.parameters()).device

    @property
    def eot_token_id(self) -> int:
        return self.sp.eos_id

    @property
    def prefix_token_id(self) -> int:
        # documents started with BOS in training (or followed an EOS without it)
        return self.sp.bos_id if self.add_bos else self.sp.eos_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.sp.path)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of `string`, BOS first when the run's policy adds one (unless add_special_tokens=False)."""
        add_bos = self.add_bos and add_special_tokens is not False
        return self.sp.encode_batch([string], add_bos=add_bos, add_eos=False)[0]

    def tok_decode(self, tokens: list[int]) -> str:
        return self.sp.decode(tokens)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the continuation tokens, whether greedy decoding yields them all)."""
        inputs = []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("lm-eval: a request with an empty continuation has nothing to score")
            if len(continuation) > self.max_length:
                raise ValueError(f"lm-eval: a continuation of {len(continuation)} tokens exceeds max_length "
                                 f"{self.max_length}; raise --max-length")
            # the model sees every token but the last, at most max_length of them
            inputs.append((context + continuation)[-(self.max_length + 1):][:-1])
        # longest first, so each packed batch holds similar lengths
        order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            scores = self._score_packed([inputs[i] for i in batch], [requests[i][2] for i in batch])
            for i, score in zip(batch, scores):
                results[i] = score
                if requests[i][0][1] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], score)
        return results

    def _score_packed(self, inputs: list[list[int]], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """One forward over the inputs packed into [1, sum of lengths] with cu_seqlens; each continuation is
        predicted by the last len(continuation) positions of its input."""
        ends = list(itertools.accumulate(len(x) for x in inputs))
        ids = torch.tensor([sum(inputs, [])], dtype=torch.long, device=self.device)  # [1, T]
        cu = torch.tensor([0, *ends], dtype=torch.int32, device=self.device)
        with autocast_context(self.precision, self.device):
            logits = self.model(ids, cu_seqlens=cu).logits[0]  # [T, V]
        out = []
        for end, continuation in zip(ends, continuations):
            rows = logits[end - len(continuation):end].float().log_softmax(-1)  # [len(continuation), V]
            target = torch.tensor(continuation, device=self.device)
            logprob = rows.gather(-1, target[:, None]).sum().item()
            out.append((logprob, bool((rows.argmax(-1) == target).all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole document after the prefix token, in windows of max_length."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows: list[TokenRequest] = []
        owner = []
        for n, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string, add_special_tokens=False)
            for context, predicted in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append(((None, None), context, predicted))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[n] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context, cut before the first stop string (gen_kwargs "until")."""
        jobs = []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            sampling = (temperature, float(kwargs.pop("top_p", 1.0)), int(kwargs.pop("top_k", 0)))
            # room for the new tokens inside max_length
            ids = self.tok_encode(context)[-max(self.max_length - max_new, 1):] or [self.prefix_token_id]
            jobs.append((ids, until, max_new, sampling))
        order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i][0]))
        # attention decodes one request at a time (its KV cache takes no packed prefill)
        step = 1 if self.model.config.arch == "transformer" else self.batch_size
        results: list[str | None] = [None] * len(jobs)
        for start in range(0, len(order), step):
            batch = order[start:start + step]
            for i, text in zip(batch, self._generate([jobs[i] for i in batch])):
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    def _generate(self, jobs: list[tuple[list[int], list[str], int, tuple[float, float, int]]]) -> list[str]:
        """Decode a batch of (context ids, stop strings, max new tokens, (temperature, top_p, top_k)) on the
        model's cache."""
        num_rows = len(jobs)
        if num_rows == 1:
            ids, cu = torch.tensor([jobs[0][0]], device=self.device), None
        else:
            ids = torch.tensor([sum((job[0] for job in jobs), [])], device=self.device)  # [1, T]
            lengths = torch.tensor([len(job[0]) for job in jobs])
            cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(self.device, torch.int32)
        with autocast_context(self.precision, self.device):
            out = self.model(ids, cu_seqlens=cu, use_cache=True)
        # [N, V]: the last position of each context
        last = out.logits[0, cu[1:].long() - 1] if cu is not None else out.logits[:, -1]
        generated: list[list[int]] = [[] for _ in jobs]
        done = [False] * num_rows
        for _ in range(max(job[2] for job in jobs)):
            # [N]: each row with its own sampling settings (temperature 0: argmax)
            next_ids = torch.cat([sample_next_token(last[n:n + 1], *job[3]) for n, job in enumerate(jobs)])
            for n, token in enumerate(next_ids.tolist()):
                if done[n]:
                    continue
                generated[n].append(token)
                text = self.tok_decode(generated[n])
                _, until, max_new, _ = jobs[n]
                done[n] = (token == self.eot_token_id or len(generated[n]) >= max_new
                           or any(s and s in text for s in until))
            if all(done):
                break
            with autocast_context(self.precision, self.device):
                out = self.model(next_ids[:, None], cache=out.cache, use_cache=True)
            last = out.logits[:, -1]
        texts = []
        for tokens, (_, until, _, _) in zip(generated, jobs):
            if self.eot_token_id in tokens:
                tokens = tokens[:tokens.index(self.eot_token_id)]
            text = self.tok_decode(tokens)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            texts.append(text)
        return texts


def run_lm_eval(checkpoint: str | os.PathLike, tasks: list[str], batch_size: int = 8, limit: float | None = None,
                num_fewshot: int | None = None, include_path: str | None = None, max_length: int | None = None,
                bootstrap_iters: int = 100000, log_samples: bool = False, seed: int = 0,
                overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Score a checkpoint (a step directory or a run directory: its latest) on lm-eval tasks.

    Returns {"checkpoint", "step", "results": {task: {metric: value}}, "path": results JSON, "lm_eval": lm-eval's
    whole output (with per-request "samples" when log_samples)}. The JSON goes to <run>/lm_eval/, the metrics to
    <run>/metrics.jsonl; overrides apply to the checkpoint's config (e.g. run.device=cpu)."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    path = resolve_checkpoint(checkpoint)
    run_dir = path.parents[1]
    # metrics go to the run holding this checkpoint, wherever it was moved
    cfg = checkpoint_config(path, [f"run.dir={run_dir.parent}", f"run.name={run_dir.name}",
                                   "logging.progress_bar=false", *overrides])
    if cfg.data.source == "mqar":
        raise ConfigError("lm-eval scores text, and this checkpoint was trained on MQAR (no tokenizer); use "
                          "`mom-train eval` for its recall accuracy")
    device = resolve_device(cfg)
    lm = MomLM(load_model(path, cfg, device), load_tokenizer(cfg.data.tokenizer), cfg.data.add_bos,
               cfg.training.precision, batch_size, max_length or cfg.training.seq_len)
    output = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                             task_manager=task_manager(tasks, include_path), log_samples=log_samples,
                             bootstrap_iters=bootstrap_iters, random_seed=seed, numpy_random_seed=seed,
                             torch_random_seed=seed, fewshot_random_seed=seed)
    step = int(path.name.split("_")[-1])
    results = {task: _metrics(values) for task, values in output["results"].items()}
    out_dir = run_dir / "lm_eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{path.name}.json"
    saved = {k: v for k, v in output.items() if k != "samples"}
    json_path.write_text(json.dumps({"checkpoint": str(path), "step": step, **saved}, indent=2,
                                    default=handle_non_serializable) + "\n")
    if log_samples:
        with open(out_dir / f"{path.name}_samples.jsonl", "w") as f:
            for task, samples in output["samples"].items():
                for sample in samples:
                    f.write(json.dumps({"task": task, **sample}, default=handle_non_serializable) + "\n")
    _log_metrics(cfg, device, step, results)
    return {"checkpoint": str(path), "step": step, "results": results, "path": str(json_path), "lm_eval": output}


def task_manager(tasks: list[str], include_path: str | None = None):
    """lm-eval's TaskManager: over include_path alone when it defines every task asked for (indexing the
    harness's own task files takes many seconds), else over both."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    return TaskManager(include_path=include_path)


def _metrics(values: dict[str, Any]) -> dict[str, float]:
    """lm-eval's "acc,none": 0.5 -> "acc": 0.5 (other filters keep their suffix); metrics only."""
    out = {}
    for key, value in values.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or key == "sample_len":
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt in ("", "none") else f"{metric}/{filt}"] = value
    return out


def _log_metrics(cfg: Config, device: torch.device, step: int, results: dict[str, dict[str, float]]) -> None:
    """One metrics.jsonl record {"step", "lm_eval": {task: {metric: value}}} (and wandb, when the run logs
    there)."""
    from mom_train.metrics import MetricsLogger

    logger = MetricsLogger(cfg, ParallelDims(device=device), step)
    logger.log({"step": step, "lm_eval": results})
    logger.message(f"lm-eval at step {step}: " + "; ".join(
        f"{task} " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()) for task, metrics in results.items()))
    logger.close()

