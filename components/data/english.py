"""A small deterministic synthetic English generator: templated sentences over a fixed vocabulary.

It gives the tiny preset generic prose next to the reasoning problems, without downloading anything.
The text is grammatical but meaningless; it teaches a small model word shapes, spacing, punctuation,
capitalisation and paragraph structure. Same seed -> same documents, on every platform and Python
(`random.Random` with an integer seed is stable).
"""

from __future__ import annotations

import random

_NAMES = (
    "Ada Alan Grace Linus Marie Nikola Rosalind Emmy Srinivasa Sofia Carl Hedy Katherine Niels Lise "
    "Dorothy Claude Barbara John Mary Ravi Mei Omar Lena Tariq Ines Kofi Yuki Pablo Anya"
).split()
_NOUNS = (
    "river mountain village garden library bridge forest island harbor market kitchen window station "
    "teacher farmer sailor doctor painter baker student engineer child neighbor traveler musician "
    "book letter lamp map clock basket bicycle boat song story question answer idea plan problem "
    "number pattern machine engine tower castle field road valley lake cloud storm season morning "
    "evening winter summer autumn spring friend family city country school museum theatre factory"
).split()
_ADJS = (
    "old young quiet bright dark small large narrow wide warm cold careful curious patient busy calm "
    "strange simple clever gentle heavy light early late green blue golden silver ancient modern "
    "distant nearby hidden famous ordinary steady sudden"
).split()
_VERBS_T = (
    "found built painted opened closed carried followed visited measured counted repaired described "
    "remembered watched crossed studied wrote read answered solved shared planted cleaned explored "
    "drew moved checked noticed"
).split()
_VERBS_I = (
    "waited smiled laughed rested travelled worked listened wondered arrived returned slept sang "
    "walked hurried paused"
).split()
_VERBS_BASE = "find build paint open carry follow visit measure count repair describe watch cross study".split()
_ADVS = "slowly quickly quietly carefully happily gently suddenly finally patiently often rarely".split()
_PREPS = "near behind under above beside across through inside around beyond".split()
_TIMES = (
    "in the morning|at noon|in the evening|at night|every day|last week|next spring|before dawn|"
    "after the storm|during the winter|on a rainy day|long ago"
).split("|")
_CONNECTIVES = "However|Later|Meanwhile|Afterwards|Still|Then|Soon|In the end|At first|Of course".split("|")


def _np(r: random.Random) -> str:
    """A noun phrase: 'the old river', 'a lamp', 'Ada'."""
    k = r.random()
    if k < 0.2:
        return r.choice(_NAMES)
    noun = r.choice(_NOUNS)
    adj = f"{r.choice(_ADJS)} " if r.random() < 0.5 else ""
    if r.random() < 0.6:
        return f"the {adj}{noun}"
    word = f"{adj}{noun}"
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _sentence(r: random.Random) -> str:
    t = r.randrange(10)
    if t == 0:
        s = f"{_np(r)} {r.choice(_VERBS_T)} {_np(r)} {r.choice(_TIMES)}"
    elif t == 1:
        s = f"{_np(r)} {r.choice(_VERBS_I)} {r.choice(_ADVS)} {r.choice(_PREPS)} {_np(r)}"
    elif t == 2:
        s = f"{r.choice(_CONNECTIVES)}, {_np(r)} {r.choice(_VERBS_T)} {_np(r)}"
    elif t == 3:
        s = f"{_np(r)} was {r.choice(_ADJS)} and {r.choice(_ADJS)}"
    elif t == 4:
        s = f"{r.choice(_TIMES)}, {_np(r)} {r.choice(_VERBS_I)} {r.choice(_PREPS)} {_np(r)}"
    elif t == 5:
        s = f"{_np(r)} {r.choice(_VERBS_T)} {r.randint(2, 99)} {_plural(r.choice(_NOUNS))} {r.choice(_TIMES)}"
    elif t == 6:
        s = f"{_np(r)} said that {_np(r)} {r.choice(_VERBS_T)} {_np(r)}"
    elif t == 7:
        s = f"when {_np(r)} {r.choice(_VERBS_I)}, {_np(r)} {r.choice(_VERBS_T)} {_np(r)}"
    elif t == 8:
        s = f"{_np(r)} {r.choice(_VERBS_I)} because {_np(r)} was {r.choice(_ADJS)}"
    else:
        return _cap(f"why did {_np(r)} {r.choice(_VERBS_BASE)} {_np(r)}") + "?"
    return _cap(s) + ("!" if r.random() < 0.05 else ".")


def _plural(noun: str) -> str:
    if noun == "child":
        return "children"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def generic_documents(n_docs: int, seed: int, min_sentences: int = 3, max_sentences: int = 12) -> list[str]:
    """`n_docs` documents of `min_sentences..max_sentences` sentences, in one or two paragraphs."""
    r = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        n = r.randint(min_sentences, max_sentences)
        sentences = [_sentence(r) for _ in range(n)]
        if n >= 6 and r.random() < 0.5:
            cut = r.randint(2, n - 2)
            docs.append(" ".join(sentences[:cut]) + "\n\n" + " ".join(sentences[cut:]))
        else:
            docs.append(" ".join(sentences))
    return docs
