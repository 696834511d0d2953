"""nanochat's midtraining and SFT mixtures (its scripts/mid_train.py and scripts/chat_sft.py), built from what is here.

The real sources (SmolTalk, MMLU auxiliary_train, GSM8K train, ARC train) come from `tools/fetch_data.py chat`
into a directory passed as `chat_data`; without it they are left out, and the recipe says which and why. The
synthetic tasks (SimpleSpelling, SpellingBee: train seeds) and the identity conversations are always there.
`scale` multiplies every task's count (1.0: nanochat's numbers; the demo trains on a sliver). Evaluation splits
that ChatCORE scores are never trained on: validation uses SmolTalk's test split, or held-out spelling examples.
"""
from __future__ import annotations

from megachat.tasks import gsm8k, multiple_choice, smoltalk
from megachat.tasks.identity import identity
from megachat.tasks.mixture import Part, TaskMixture
from megachat.tasks.spelling import SimpleSpelling, SpellingBee


def _count(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def _real_parts(chat_data, wanted, scale, left_out):
    """The Parts of the real sources in `wanted` [(name, loader name, count or None = all, repeats)]."""
    parts = []
    for name, loader, count, repeats in wanted:
        if chat_data is None:
            left_out[name] = "no --chat-data directory (fetch it with tools/fetch_data.py chat)"
            continue
        load = {"smoltalk_train": lambda: smoltalk.smoltalk(chat_data, "train"),
                "smoltalk_test": lambda: smoltalk.smoltalk(chat_data, "test"),
                "mmlu_aux": lambda: multiple_choice.mmlu_auxiliary_train(chat_data),
                "gsm8k_train": lambda: gsm8k.gsm8k_train(chat_data),
                "arc_easy_train": lambda: multiple_choice.arc_train(chat_data, "ARC-Easy"),
                "arc_challenge_train": lambda: multiple_choice.arc_train(chat_data, "ARC-Challenge")}[loader]
        try:
            task = load()
        except FileNotFoundError as e:
            left_out[name] = str(e)
            continue
        parts.append(Part(name, task.conversations, repeats=repeats,
                          limit=None if count is None else _count(count, scale)))
    return parts


def mid_mixture(chat_data=None, identity_path=None, scale=1.0, seed=42):
    """(train mixture, validation mixture, {left-out task: why}) of nanochat's midtraining."""
    left_out = {}
    train = _real_parts(chat_data, [("SmolTalk", "smoltalk_train", None, 1), ("MMLU-aux", "mmlu_aux", None, 1),
                                    ("GSM8K", "gsm8k_train", None, 1)], scale, left_out)
    train += [Part("identity", identity(_count(1000, scale), seed=0, path=identity_path).conversations, repeats=2),
              Part("SimpleSpelling", SimpleSpelling(_count(200_000, scale), "train")),
              Part("SpellingBee", SpellingBee(_count(80_000, scale), "train"))]
    val = _real_parts(chat_data, [("SmolTalk-test", "smoltalk_test", 24_000, 1)], scale, {})
    if not val:  # held-out synthetic examples (SpellingBee's test seeds, which ChatCORE scores, are not used)
        val = [Part("SimpleSpelling-val", SimpleSpelling(_count(5_000, scale), "test")),
               Part("identity-val", identity(_count(200, scale), seed=1, path=identity_path).conversations)]
    return TaskMixture(train, seed), TaskMixture(val, seed), left_out


def sft_mixture(chat_data=None, identity_path=None, scale=1.0, seed=42):
    """(train mixture, validation mixture, {left-out task: why}) of nanochat's SFT."""
    left_out = {}
    train = _real_parts(chat_data, [("ARC-Easy", "arc_easy_train", None, 1),
                                    ("ARC-Challenge", "arc_challenge_train", None, 1),
                                    ("GSM8K", "gsm8k_train", None, 1), ("SmolTalk", "smoltalk_train", 10_000, 1)],
                        scale, left_out)
    train += [Part("identity", identity(_count(1000, scale), seed=2, path=identity_path).conversations),
              Part("SimpleSpelling", SimpleSpelling(_count(300, scale), "train")),
              Part("SpellingBee", SpellingBee(_count(300, scale), "train"))]
    val = _real_parts(chat_data, [("SmolTalk-test", "smoltalk_test", 24_000, 1)], scale, {})
    if not val:
        val = [Part("SimpleSpelling-val", SimpleSpelling(_count(1_000, scale), "test")),
               Part("identity-val", identity(_count(100, scale), seed=3, path=identity_path).conversations)]
    return TaskMixture(train, seed), TaskMixture(val, seed), left_out
