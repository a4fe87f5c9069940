"""`mom-train lm-eval` on tiny local tasks (YAML over JSON files written here): metrics come back and are
logged, and every request's answer equals a direct computation with our model (log-likelihoods from one
unpacked forward, rolling windows from one forward each, generations from `CausalLM.generate`). The Llama
export evaluated by lm-eval's own `hf` model gives the same per-request answers."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from mom_train.checkpoint import load_model, resolve_checkpoint
from mom_train.cli import main
from mom_train.data import load_tokenizer
from tests.hf.helpers import random_checkpoint, tiny_config

pytest.importorskip("lm_eval")
CPU = torch.device("cpu")
STOPS = ["\n", "."]
MAX_GEN = 5

CHOICE_DOCS = [{"question": f"Question {i}: which colour is the {thing}?", "choices": [" red", " green", " a blue sky"],
                "answer": i % 3} for i, thing in enumerate(["sky", "grass", "apple", "sea", "sun"])]
ROLLING_DOCS = [{"text": "Mixture-of-Memories routes every token to a few of several memories."},
                {"text": "Short one."},
                # longer than --max-length: scored in several windows
                {"text": "A document long enough to need more than one window of sixteen tokens, with numbers "
                         "like 12345 and 6.78 and a second sentence after it."}]
GENERATE_DOCS = [{"prompt": "The capital of France is", "target": " Paris"},
                 {"prompt": "Once upon a time", "target": " there"},
                 {"prompt": "1, 2, 3,", "target": " 4"}]


def write_tasks(root) -> None:
    """Three tasks, one per request type, each a YAML over a JSON file."""
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    specs = {
        "tiny_choice": (CHOICE_DOCS, "output_type: multiple_choice\ndoc_to_text: question\ndoc_to_choice: choices\n"
                                     "doc_to_target: answer\nmetric_list:\n  - metric: acc\n"),
        "tiny_rolling": (ROLLING_DOCS, "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: text\n"
                                       "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"),
        "tiny_generate": (GENERATE_DOCS, "output_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: target\n"
                                         f"generation_kwargs:\n  until: {json.dumps(STOPS)}\n"
                                         f"  max_gen_toks: {MAX_GEN}\n  do_sample: false\n"
                                         "metric_list:\n  - metric: exact_match\n"),
    }
    for name, (docs, body) in specs.items():
        data = root / f"{name}.json"
        data.write_text(json.dumps(docs))
        (root / f"{name}.yaml").write_text(f"task: {name}\n" + common.format(data=data) + body)


def continuation_logprob(model, sp, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | BOS context) from one forward, and whether each of its tokens is the argmax; the
    request split as lm-eval splits it: trailing spaces of the context move to the continuation, whose tokens
    are those of the whole text after the context's."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = sp.encode_batch([context + continuation], add_bos=True)[0]
    num_context = len(sp.encode_batch([context], add_bos=True)[0])
    logits = model(torch.tensor([whole])).logits[0].double()
    logprobs = logits[num_context - 1:-1].log_softmax(-1)
    target = torch.tensor(whole[num_context:])
    return logprobs.gather(-1, target[:, None]).sum().item(), bool((logprobs.argmax(-1) == target).all())


def rolling_logprob(model, sp, text: str, max_length: int) -> float:
    """log p(text | BOS): the tokens in consecutive blocks of max_length, each block predicted from one forward
    over the max_length tokens before its end (the sequence starting with BOS)."""
    sequence = [sp.bos_id] + sp.encode_batch([text], add_bos=False)[0]
    total, start = 0.0, 1
    while start < len(sequence):
        end = min(start + max_length, len(sequence))
        window = sequence[max(0, end - 1 - max_length):end]
        logits = model(torch.tensor([window[:-1]])).logits[0].double()
        predicted = end - start
        logprobs = logits[-predicted:].log_softmax(-1)
        total += logprobs.gather(-1, torch.tensor(window[-predicted:])[:, None]).sum().item()
        start = end
    return total


def greedy_text(model, sp, prompt: str) -> str:
    ids = torch.tensor([sp.encode_batch([prompt], add_bos=True)[0]])
    tokens = model.generate(ids, MAX_GEN, temperature=0, eos_token_id=sp.eos_id)[0, ids.shape[1]:].tolist()
    if sp.eos_id in tokens:
        tokens = tokens[:tokens.index(sp.eos_id)]
    text = sp.decode(tokens)
    for stop in STOPS:
        text = text.split(stop)[0]
    return text


def read_samples(path) -> dict[str, list[dict]]:
    samples: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        sample = json.loads(line)
        samples.setdefault(sample["task"], []).append(sample)
    return {task: sorted(rows, key=lambda r: r["doc_id"]) for task, rows in samples.items()}


@pytest.mark.parametrize("arch", ["mom", "transformer"])
def test_lm_eval_answers_equal_direct_computation(tmp_path, capsys, arch: str):
    cfg = tiny_config(tmp_path / "runs", "text", arch, text=True)
    random_checkpoint(cfg)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_tasks(tasks)
    max_length = 16
    assert main(["lm-eval", "--checkpoint", str(cfg.run.path), "--tasks", "tiny_choice,tiny_rolling,tiny_generate",
                 "--include-path", str(tasks), "--batch-size", "2", "--max-length", str(max_length),
                 "--bootstrap-iters", "0", "--log-samples"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    results = printed["results"]
    assert set(results["tiny_choice"]) == {"acc"} and 0 <= results["tiny_choice"]["acc"] <= 1
    assert results["tiny_rolling"]["word_perplexity"] > 1 and "exact_match" in results["tiny_generate"]
    # results JSON in the run dir, and one metrics.jsonl record like any evaluation
    saved = json.loads((cfg.run.path / "lm_eval" / "step_0000000.json").read_text())
    assert saved["results"]["tiny_choice"]["acc,none"] == results["tiny_choice"]["acc"]
    records = [json.loads(line) for line in (cfg.run.path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1] == {"step": 0, "lm_eval": results}

    model = load_model(resolve_checkpoint(cfg.run.path), cfg, CPU)
    sp = load_tokenizer(cfg.data.tokenizer)
    samples = read_samples(cfg.run.path / "lm_eval" / "step_0000000_samples.jsonl")
    with torch.no_grad():
        for sample in samples["tiny_choice"]:
            want = [continuation_logprob(model, sp, *args) for args in sample["arguments"]]
            assert [r[0][0] for r in sample["resps"]] == pytest.approx([w[0] for w in want], rel=1e-5, abs=1e-4)
            assert [r[0][1] for r in sample["resps"]] == [w[1] for w in want]
        for sample, doc in zip(samples["tiny_rolling"], ROLLING_DOCS):
            want = rolling_logprob(model, sp, doc["text"], max_length)
            assert sample["resps"][0][0] == pytest.approx(want, rel=1e-5, abs=1e-4), doc
        assert len(sp.encode_batch([ROLLING_DOCS[2]["text"]])[0]) > 2 * max_length
        for sample, doc in zip(samples["tiny_generate"], GENERATE_DOCS):
            assert sample["resps"][0][0] == greedy_text(model, sp, doc["prompt"]), doc


def test_lm_eval_both_ways_agree_on_the_llama_export(tmp_path):
    """lm-eval's `hf` model on the exported Llama directory (transformers' model and our exported tokenizer)
    answers every multiple-choice and generation request as `mom-train lm-eval` does."""
    pytest.importorskip("transformers")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from mom_train.eval.lm_eval import run_lm_eval, task_manager
    from mom_train.hf import export_checkpoint

    cfg = tiny_config(tmp_path / "runs", "text", "transformer", text=True)
    random_checkpoint(cfg)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_tasks(tasks)
    names = ["tiny_choice", "tiny_generate"]
    ours = run_lm_eval(cfg.run.path, names, include_path=str(tasks), bootstrap_iters=0, log_samples=True)
    out = export_checkpoint(cfg.run.path, tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = HFLM(pretrained=str(out), device="cpu", batch_size=1, dtype="float32")
        theirs = simple_evaluate(model=hf, tasks=names, task_manager=task_manager(names, str(tasks)),
                                 bootstrap_iters=0, log_samples=True)
    for task in names:
        mine, other = ours["lm_eval"]["samples"][task], theirs["samples"][task]
        assert [s["arguments"] for s in mine] == [s["arguments"] for s in other]
        for a, b in zip(mine, other):
            if task == "tiny_choice":
                assert [r[0][0] for r in a["resps"]] == pytest.approx([r[0][0] for r in b["resps"]], abs=1e-4)
                assert [r[0][1] for r in a["resps"]] == [r[0][1] for r in b["resps"]]
            else:
                assert a["resps"] == b["resps"], a["doc"]
