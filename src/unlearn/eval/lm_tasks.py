"""lm-eval's own task objects scored by the native evaluator.

For a benchmark named by lm-eval (`mmlu`, `wmdp_bio_robust`, ...) lm-eval builds everything but
the forwards: its Task objects make the documents, prompts, few-shot-free contexts and choices
(`build_all_requests`), its `process_results` turns each document's (log-likelihood, greedy) pairs
into metrics, its aggregation functions aggregate them and its Group objects combine subtasks
(`Group.aggregate`). Only the log-likelihoods are computed here, by `native.score_requests`,
with lm-eval's tokenisation rules, in our batched, sorted, sharded forwards. So the numbers are
lm-eval's, for much less time.

`native_problem` says when this would not reproduce lm-eval exactly (another output type,
few-shot contexts, filters, repeats, multiple inputs, aggregations other than a mean): such a
task is evaluated by lm-eval itself (`unlearn.eval.suite` falls back automatically).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from unlearn.eval.collapse import collapse_report
from unlearn.eval.native import mean_stderr, score_requests
from unlearn.eval.split import limited_part
from unlearn.eval.tasks.utils import argmax


def _leaves(obj) -> list:
    return list(obj.get_all_tasks()) if hasattr(obj, "get_all_tasks") else [obj]


def _is_mean(fn) -> bool:
    from lm_eval.api.metrics import mean

    return fn is mean


def native_problem(obj) -> str | None:
    """Why the native path cannot reproduce this lm-eval Task or Group exactly (None: it can)."""
    for task in _leaves(obj):
        name, config = task.config.task, task.config
        if task.OUTPUT_TYPE != "multiple_choice":
            return f"{name} is {task.OUTPUT_TYPE}, not multiple_choice"
        if getattr(task, "multiple_input", 0):
            return f"{name} has multiple inputs per document"
        if config.num_fewshot not in (None, 0):
            return f"{name} is {config.num_fewshot}-shot"
        if config.filter_list is not None:
            return f"{name} filters its responses"
        if config.repeats not in (None, 1):
            return f"{name} repeats requests"
        odd = [m for m, fn in task.aggregation().items() if not _is_mean(fn)]
        if odd:
            return f"{name} aggregates {odd} by something other than a mean"
    for group in [obj, *getattr(obj, "get_all_groups", lambda: [])()]:
        for agg in getattr(group, "aggregate_metric_list", None) or []:
            if agg.aggregation not in (None, "mean"):
                return f"group {group.name} aggregates {agg.metric} by {agg.aggregation}"
    return None


def score_lm_task(
    model: torch.nn.Module,
    tokenizer,
    obj,
    limit: int | None = None,
    batch_size: int = 64,
    special_tokens: bool | None = None,
    progress: bool = False,
    part: str | None = None,
) -> dict:
    """lm-eval's metrics of a Task or Group (first `limit` documents of each subtask, and of
    those only `part`'s when given: `unlearn.eval.split`), with log-likelihoods from our
    forwards: {"n", metric, metric_stderr, ..., "collapse"}."""
    leaves = _leaves(obj)
    requests, owners = [], []
    for task in leaves:
        if part is None:
            task.build_all_requests(limit=limit, rank=0, world_size=1)
        else:  # document indices: lm-eval takes them instead of a limit
            samples = limited_part(len(task.eval_docs), limit, part)
            task.build_all_requests(samples=samples, rank=0, world_size=1)
        for inst in task.instances:
            requests.append(inst.args)
            owners.append((task, inst.doc_id, inst.idx, inst.doc))
    name = obj.name if hasattr(obj, "get_all_tasks") else obj.task_name
    scores = score_requests(
        model, tokenizer, requests, batch_size, special_tokens, progress, desc=name
    )
    per_doc: dict[tuple[int, int], dict] = {}
    for (task, doc_id, idx, doc), score in zip(owners, scores, strict=True):
        entry = per_doc.setdefault((id(task), doc_id), {"task": task, "doc": doc, "resps": {}})
        entry["resps"][idx] = score
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    positions, strings, n_choices = [], [], 0
    for entry in per_doc.values():
        task, doc = entry["task"], entry["doc"]
        resps = [entry["resps"][i] for i in sorted(entry["resps"])]
        for metric, value in task.process_results(doc, resps).items():
            values[task.task_name][metric].append(value)
        pred = argmax([ll for ll, _ in resps])
        choices = task.doc_to_choice(doc)
        positions.append(pred)
        strings.append(str(choices[pred]))
        n_choices = max(n_choices, len(choices))
    task_metrics = {t.task_name: _task_metrics(t, values[t.task_name]) for t in leaves}
    if hasattr(obj, "get_all_tasks"):
        entry = obj.aggregate(task_metrics)
    else:
        entry = task_metrics[obj.task_name]
    from unlearn.eval.harness import parse_metrics  # the one reader of lm-eval's result keys

    result: dict = {"n": sum(len(next(iter(values[t.task_name].values()))) for t in leaves)}
    result.update(parse_metrics({k: v for k, v in entry.items() if "," in k}, name))
    result["collapse"] = collapse_report(positions, strings, n_choices=n_choices)
    return result


def _task_metrics(task, values: dict[str, Sequence[float]]) -> dict:
    """One subtask's entry as lm-eval's evaluator writes it: "metric,none", its stderr, size."""
    entry: dict = {}
    aggregations = task.aggregation()
    for metric, xs in values.items():
        if metric not in aggregations:
            continue
        entry[f"{metric},none"] = aggregations[metric](list(xs))
        entry[f"{metric}_stderr,none"] = mean_stderr(xs)[1] if len(xs) > 1 else "N/A"
        entry["sample_len"] = len(xs)
    return entry
