"""SpellingBee and SimpleSpelling: nanochat's synthetic spelling tasks, generated on demand from a word list.

SpellingBee ("How many r are in strawberry?"): example i draws, from random.Random(its seed), a word, a letter
(from the word with p = 0.9, else any of a-z), one of 51 question templates (30 English, 21 in es/zh/ko/fr/de/ja;
lower-cased 30% of the time, letter and word each optionally quoted with ' or ", a trailing "?" half the time).
The answer spells the word out ("word:w,o,r,d"), counts by hand ("i:c", " hit! count=n" on a match), checks with
the calculator (a python part `'word'.count('letter')` and its python_output), and ends "#### n"; it is scored
like GSM8K (first "#### n", exact match).
SimpleSpelling: "Spell the word: {w}" -> "{w}:{w,o,r,d}", the words shuffled with Random(42) first.

Seeds: example i of the train split uses seed i, of the test split TEST_SEED_OFFSET + i, so the splits never share
an example (nanochat@885a4f2 used -(i + 1) for test, but Python seeds with abs(seed): its test example i was
train example i + 1). Words: the web2 list of english-words==2.0.2 (234,448 lower-case a-z words; nanochat uses
dwyl's words_alpha.txt, 370K, not on a package registry); see evaluation/sources.py.
"""
from __future__ import annotations

import random
import string
from collections.abc import Sequence
from functools import lru_cache

from megachat.evaluation import sources
from megachat.tasks import gsm8k
from megachat.tasks.task import Task

TEST_SEED_OFFSET = 10_000_000  # more than any train split's size: train seeds < offset <= test seeds

TEMPLATES = (
    "How many {letter} are in the word {word}",
    "How many {letter} are in {word}",
    "Count the number of {letter} in {word}",
    "How many times does {letter} appear in {word}",
    "What's the count of {letter} in {word}",
    "In the word {word}, how many {letter} are there",
    "How many letter {letter} are in the word {word}",
    "Count how many {letter} appear in {word}",
    "Tell me the number of {letter} in {word}",
    "How many occurrences of {letter} are in {word}",
    "Find the count of {letter} in {word}",
    "Can you count the {letter} letters in {word}",
    "What is the frequency of {letter} in {word}",
    "How many {letter}s are in {word}",
    "How many {letter}'s are in {word}",
    "Count all the {letter} in {word}",
    "How many times is {letter} in {word}",
    "Number of {letter} in {word}",
    "Total count of {letter} in {word}",
    "How many {letter} does {word} have",
    "How many {letter} does {word} contain",
    "What's the number of {letter} in {word}",
    "{word} has how many {letter}",
    "In {word}, count the {letter}",
    "How many {letter} appear in {word}",
    "Count the {letter} in {word}",
    "Give me the count of {letter} in {word}",
    "How many instances of {letter} in {word}",
    "Show me how many {letter} are in {word}",
    "Calculate the number of {letter} in {word}",
    # Spanish
    "¿Cuántas {letter} hay en {word}?",
    "¿Cuántas veces aparece {letter} en {word}?",
    "Cuenta las {letter} en {word}",
    "¿Cuántas letras {letter} tiene {word}?",
    # Chinese (simplified)
    "{word}中有多少个{letter}",
    "{word}里有几个{letter}",
    "数一下{word}中的{letter}",
    "{word}这个词里有多少{letter}",
    # Korean
    "{word}에 {letter}가 몇 개 있나요",
    "{word}에서 {letter}의 개수는",
    "{word}에 {letter}가 몇 번 나오나요",
    "{word}라는 단어에 {letter}가 몇 개",
    # French
    "Combien de {letter} dans {word}",
    "Combien de fois {letter} apparaît dans {word}",
    "Compte les {letter} dans {word}",
    # German
    "Wie viele {letter} sind in {word}",
    "Wie oft kommt {letter} in {word} vor",
    "Zähle die {letter} in {word}",
    # Japanese
    "{word}に{letter}は何個ありますか",
    "{word}の中に{letter}がいくつ",
    "{word}に{letter}が何回出てくる",
)


@lru_cache(maxsize=2)
def word_list(data_dir=None) -> tuple[str, ...]:
    """The sorted word list (read once per cache directory)."""
    return tuple(sources.read_english_words(data_dir))


def seed_of(index: int, split: str) -> int:
    """The random seed of example `index` of a split ("train" or "test")."""
    return index if split == "train" else TEST_SEED_OFFSET + index


def _check_split(name: str, size: int, split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"{name} split {split!r}: use 'train' or 'test'")
    if size < 0 or size > TEST_SEED_OFFSET:
        raise ValueError(f"{name} size {size}: use 0 to {TEST_SEED_OFFSET} examples (more train examples would "
                         f"reach the test split's seeds)")


def spelling_bee_example(word: str, letter: str, rng: random.Random) -> dict:
    """The conversation asking how often `letter` occurs in `word` (rng picks the phrasing)."""
    template = rng.choice(TEMPLATES)
    if rng.random() < 0.3:
        template = template.lower()
    letter_quote, word_quote = rng.choice(("", "'", '"')), rng.choice(("", "'", '"'))
    question = template.format(letter=f"{letter_quote}{letter}{letter_quote}", word=f"{word_quote}{word}{word_quote}")
    if rng.random() < 0.5:
        question += "?"
    manual = (f"We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual approach "
              f"first.\n\nFirst spell the word out:\n{word}:{','.join(word)}\n\nThen count the occurrences of "
              f"'{letter}':\n")
    count = 0
    for i, char in enumerate(word, 1):
        if char == letter:
            count += 1
            manual += f"{i}:{char} hit! count={count}\n"  # "i:c" with no space: " a" and "a" are other tokens
        else:
            manual += f"{i}:{char}\n"
    manual += f"\nThis gives us {count}."
    parts = [{"type": "text", "text": manual},
             {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
             {"type": "python", "text": f"'{word}'.count('{letter}')"},
             {"type": "python_output", "text": str(count)},
             {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"}]
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
            "answer": str(count)}


class _Generated(Sequence):
    """`size` examples of a split, example i made from its own seed (seed_of) when indexed."""
    name = ""

    def __init__(self, size: int, split: str = "train", words: Sequence[str] | None = None, data_dir=None):
        _check_split(self.name, size, split)
        self.size, self.split = size, split
        self.words = words if words is not None else word_list(data_dir)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.size))]
        if not -self.size <= index < self.size:
            raise IndexError(f"{self.name} index {index} out of range for size {self.size}")
        return self.example(random.Random(seed_of(index % self.size, self.split)))


class SpellingBee(_Generated):
    """`size` SpellingBee conversations of a split: how often a letter occurs in a word."""
    name = "SpellingBee"

    def example(self, rng: random.Random) -> dict:
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(string.ascii_lowercase)
        return spelling_bee_example(word, letter, rng)


class SimpleSpelling(_Generated):
    """`size` SimpleSpelling conversations of a split: spell one word."""
    name = "SimpleSpelling"

    def __init__(self, size: int, split: str = "train", words: Sequence[str] | None = None, data_dir=None):
        super().__init__(size, split, words, data_dir)
        self.words = list(self.words)
        random.Random(42).shuffle(self.words)  # another order than SpellingBee's

    def example(self, rng: random.Random) -> dict:
        word = rng.choice(self.words)
        return {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                             {"role": "assistant", "content": f"{word}:{','.join(word)}"}]}


def score_spelling(conversation: dict, completion: str) -> bool:
    """The completion is exactly the reference spelling."""
    return completion.strip() == conversation["messages"][-1]["content"]


def spelling_bee(size: int = 256, split: str = "test", data_dir=None) -> Task:
    """The SpellingBee task (ChatCORE uses 256 test examples, as nanochat)."""
    return Task("SpellingBee", SpellingBee(size, split, data_dir=data_dir), "generative", gsm8k.score)


def simple_spelling(size: int = 1000, split: str = "train", data_dir=None) -> Task:
    """The SimpleSpelling task (for training mixtures)."""
    return Task("SimpleSpelling", SimpleSpelling(size, split, data_dir=data_dir), "generative", score_spelling)
