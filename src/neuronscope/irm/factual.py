"""What a realignment costs the answers' facts: a built-in set of short-answer questions with known answers, and a
judge that marks an answer right when it contains an accepted answer string.

    FACTS[0]                                   # Fact("What is the capital of Australia?", ("Canberra",))
    is_correct("The capital is Canberra.", FACTS[0])     # True
    is_correct("Sydney is the capital.", FACTS[0])       # False

The judge is deliberately simple and offline: case-folded, whole-word match of any accepted string (so "Canberra"
counts, "Canberran" does not; "8" counts in "8 legs" but not in "18"). It does not read negation ("not Canberra"
counts as right), which is why the questions ask for one short fact each. The 40 questions are neuronscope's own,
everyday facts a small instruct model knows at least some of (geography, science, arithmetic, history, language).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Sequence

from ..errors import NeuronscopeError


@dataclass(frozen=True)
class Fact:
    """A short-answer question and the strings that count as a right answer."""
    question: str
    accepted: tuple[str, ...]


FACTS: tuple[Fact, ...] = (
    Fact("What is the capital of Australia?", ("Canberra",)),
    Fact("What is the capital of France?", ("Paris",)),
    Fact("What is the capital of Italy?", ("Rome",)),
    Fact("What is the capital of Germany?", ("Berlin",)),
    Fact("What is the capital of Spain?", ("Madrid",)),
    Fact("What is the capital of Canada?", ("Ottawa",)),
    Fact("What is the capital of Egypt?", ("Cairo",)),
    Fact("What is the capital of the United Kingdom?", ("London",)),
    Fact("Which planet is known as the Red Planet?", ("Mars",)),
    Fact("What is the largest planet in our solar system?", ("Jupiter",)),
    Fact("Which planet is closest to the Sun?", ("Mercury",)),
    Fact("What is the chemical symbol for gold?", ("Au",)),
    Fact("What is the chemical symbol for sodium?", ("Na",)),
    Fact("What gas do plants absorb from the air for photosynthesis?", ("carbon dioxide", "CO2")),
    Fact("What is the boiling point of water in degrees Celsius at sea level?", ("100",)),
    Fact("What is the freezing point of water in degrees Celsius?", ("0", "zero")),
    Fact("How many legs does a spider have?", ("8", "eight")),
    Fact("How many days are there in a week?", ("7", "seven")),
    Fact("How many continents are there on Earth?", ("7", "seven")),
    Fact("How many sides does a hexagon have?", ("6", "six")),
    Fact("What is 12 times 12?", ("144",)),
    Fact("What is 15 plus 27?", ("42", "forty-two")),
    Fact("What is the square root of 81?", ("9", "nine")),
    Fact("Who wrote the play Romeo and Juliet?", ("Shakespeare",)),
    Fact("Who painted the Mona Lisa?", ("Leonardo", "da Vinci")),
    Fact("Who developed the theory of relativity?", ("Einstein",)),
    Fact("Who was the first person to walk on the Moon?", ("Armstrong",)),
    Fact("What is the largest ocean on Earth?", ("Pacific",)),
    Fact("What is the longest river in Africa?", ("Nile",)),
    Fact("What is the tallest mountain in the world?", ("Everest",)),
    Fact("What is the largest mammal on Earth?", ("blue whale",)),
    Fact("What is the hardest natural substance?", ("diamond",)),
    Fact("What language is mainly spoken in Brazil?", ("Portuguese",)),
    Fact("What is the currency of Japan?", ("yen",)),
    Fact("In which country are the pyramids of Giza?", ("Egypt",)),
    Fact("What is the main ingredient of guacamole?", ("avocado",)),
    Fact("What organ pumps blood through the human body?", ("heart",)),
    Fact("What is the opposite of the word 'hot'?", ("cold",)),
    Fact("What color do you get by mixing blue and yellow?", ("green",)),
    Fact("In what year did World War II end?", ("1945",)),
)


def _pattern(accepted: str) -> re.Pattern[str]:
    words = [re.escape(w) for w in accepted.casefold().split()]
    return re.compile(r"(?<![\w])" + r"\s+".join(words) + r"(?![\w])")


def is_correct(answer: str, fact: Fact) -> bool:
    """True when the answer contains one of the fact's accepted strings as whole words (case-folded)."""
    text = answer.casefold()
    return any(_pattern(a).search(text) for a in fact.accepted)


def score_answers(answers: Sequence[str], facts: Sequence[Fact]) -> list[float]:
    """1.0 for each right answer, 0.0 for each wrong one (paired with facts in order)."""
    if len(answers) != len(facts):
        raise NeuronscopeError("Give one answer per factual question.")
    return [1.0 if is_correct(a, f) else 0.0 for a, f in zip(answers, facts)]


def facts_digest(facts: Sequence[Fact] = FACTS) -> str:
    """A short digest of the question set (recorded next to the scores)."""
    h = hashlib.sha256()
    for f in facts:
        h.update((f.question + "\t" + "|".join(f.accepted) + "\n").encode())
    return h.hexdigest()[:16]


__all__ = ["Fact", "FACTS", "is_correct", "score_answers", "facts_digest"]
