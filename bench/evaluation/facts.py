"""Fictitious facts about invented people, in the spirit of TOFU: an evaluation set we own end to end.

No benchmark data downloads here, and a model cannot know these facts before we teach them, so "forgotten"
and "never learned" are measurable. Everything is a pure function of ``(n_people, seed)``.

Each person has one value for each of `ATTRIBUTES` (birthplace, birth year, profession, genre, first book,
award, instrument). Each attribute has four question paraphrases: the first three are the *training*
paraphrases (what a model is taught and what a deletion request names), the fourth is *held out* (D.U.: the
forgotten distribution, never trained on). So one person = 21 training QA pairs + 7 held-out ones.

Every QA pair carries `candidates`: the true answer plus distractors of the same attribute, fixed per
(person, attribute), so accuracy can be judged by likelihood ranking (see `adapters.lm.scoring`).

    facts = generate(40, seed=0)
    split = facts.split(n_forget=10)           # forget / retain people, by person
    facts.qa(split.forget[0])                  # 21 training QA pairs of one person
    facts.qa(split.forget[0], held_out=True)   # its 7 held-out paraphrases
    GENERAL                                    # general-knowledge QA the base model already knows
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from adapters.lm.prompts import PROMPT, format_prompt  # noqa: F401  (re-exported: the layout facts are asked in)
from adapters.lm.random_labels import AWARDS, CITIES, GENRES, INSTRUMENTS, PROFESSIONS, TITLES, YEARS

N_CANDIDATES = 5

_FIRST = ["Liora", "Tobias", "Maren", "Idris", "Selka", "Oren", "Vesna", "Caspian", "Ilse", "Dorian", "Nadia",
          "Emrys", "Talia", "Brennan", "Yara", "Lucan", "Signe", "Rafferty", "Anouk", "Kasimir", "Elodie", "Matthias",
          "Zora", "Anselm", "Freya", "Cyprian", "Linnea", "Osric", "Mireille", "Teodor"]
_LAST = ["Vantrel", "Ostrowe", "Kellbrook", "Amarov", "Thistlewood", "Quennell", "Marsk", "Delacroixe", "Halloran",
         "Iversund", "Pellegrin", "Strand", "Vasquell", "Ormsby", "Lindqvar", "Catterall", "Brisco", "Novatny",
         "Fairweather", "Keszler", "Rautio", "Mabery", "Sorrentel", "Achterberg", "Wyncott", "Duvalier"]

# attribute -> (value pool or None when generated, four question paraphrases; the last one is held out)
ATTRIBUTES: dict[str, tuple[list[str] | None, tuple[str, ...]]] = {
    "birthplace": (CITIES, (
        "Where was {name} born?",
        "What is the birthplace of {name}?",
        "In which city was {name} born?",
        "{name} was born in which city?")),
    "birth_year": (YEARS, (
        "In what year was {name} born?",
        "What is the birth year of {name}?",
        "When was {name} born?",
        "{name} was born in which year?")),
    "profession": (PROFESSIONS, (
        "What is the profession of {name}?",
        "What does {name} do for a living?",
        "What job does {name} have?",
        "{name} works as what?")),
    "genre": (GENRES, (
        "What genre does {name} write?",
        "In which genre does {name} publish books?",
        "What kind of books does {name} write?",
        "{name} is known for writing which genre?")),
    "book": (None, (
        "What is the title of the first book by {name}?",
        "What was {name}'s first book called?",
        "Which book did {name} publish first?",
        "{name}'s debut book has what title?")),
    "award": (AWARDS, (
        "Which award did {name} win?",
        "What prize was {name} given?",
        "What award has {name} received?",
        "{name} is a winner of which award?")),
    "instrument": (INSTRUMENTS, (
        "Which instrument does {name} play?",
        "What musical instrument does {name} play?",
        "What instrument is {name} known to play?",
        "{name} plays which instrument?")),
}
TRAIN_PARAPHRASES = 3  # paraphrases 0..2 are taught/forgotten; paraphrase 3 is held out (D.U.)
BOOKS = TITLES  # first-book titles


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    person: str  # the person's name, or "" for general knowledge
    attribute: str
    paraphrase: int
    candidates: tuple[str, ...]  # the answer plus distractors, in a fixed shuffled order

    @property
    def prompt(self) -> str:
        return format_prompt(self.question)


@dataclass(frozen=True)
class Person:
    name: str
    facts: tuple[tuple[str, str], ...]  # (attribute, value) in ATTRIBUTES order

    def value(self, attribute: str) -> str:
        return dict(self.facts)[attribute]


@dataclass(frozen=True)
class FactSplit:
    forget: tuple[Person, ...]  # candidates for deletion requests, in request order
    retain: tuple[Person, ...]  # never forgotten (R.D.)


@dataclass(frozen=True)
class FactSet:
    people: tuple[Person, ...]
    seed: int

    def qa(self, person: Person, held_out: bool = False) -> list[QA]:
        """A person's training QA pairs (3 paraphrases x 7 attributes), or the held-out paraphrase of each."""
        out = []
        for attribute, value in person.facts:
            templates = ATTRIBUTES[attribute][1]
            cands = _candidates(attribute, value, f"{self.seed}:{person.name}:{attribute}")
            indices = [TRAIN_PARAPHRASES] if held_out else range(TRAIN_PARAPHRASES)
            out += [QA(templates[i].format(name=person.name), value, person.name, attribute, i, cands) for i in indices]
        return out

    def qa_of(self, people, held_out: bool = False) -> list[QA]:
        return [q for p in people for q in self.qa(p, held_out)]

    def split(self, n_forget: int) -> FactSplit:
        """The first `n_forget` people are forget candidates, the rest are retained (already shuffled by seed)."""
        if not 0 < n_forget < len(self.people):
            raise ValueError(f"n_forget must be in 1..{len(self.people) - 1}")
        return FactSplit(self.people[:n_forget], self.people[n_forget:])


def generate(n_people: int, seed: int = 0) -> FactSet:
    """`n_people` invented people with unique names and first-book titles; deterministic in (n_people, seed)."""
    rng = random.Random(seed)
    names = [f"{first} {last}" for first in _FIRST for last in _LAST]
    if n_people > len(names):
        raise ValueError(f"at most {len(names)} people")
    rng.shuffle(names)
    books = list(BOOKS)
    rng.shuffle(books)
    people = []
    for i, name in enumerate(names[:n_people]):
        facts = []
        for attribute, (pool, _) in ATTRIBUTES.items():
            facts.append((attribute, books[i] if pool is None else rng.choice(pool)))
        people.append(Person(name, tuple(facts)))
    return FactSet(tuple(people), seed)


def _candidates(attribute: str, value: str, key: str) -> tuple[str, ...]:
    pool = ATTRIBUTES[attribute][0] or BOOKS
    rng = random.Random(zlib.crc32(key.encode()))  # stable across processes (unlike hash())
    distractors = rng.sample([v for v in pool if v != value], N_CANDIDATES - 1)
    cands = [value, *distractors]
    rng.shuffle(cands)
    return tuple(cands)


def _general(question: str, answer: str, *distractors: str) -> QA:
    cands = [answer, *distractors]
    random.Random(zlib.crc32(question.encode())).shuffle(cands)
    return QA(question, answer, "", "general", 0, tuple(cands))


# Simple general knowledge for the utility measure (accuracy on these must not drop after unlearning): the
# questions that SmolLM2-135M-Instruct ranks correctly with `adapters.lm.scoring` (measured: 18 of 30 drafted;
# the 12 it missed, e.g. "capital of Japan", "legs of a spider", were dropped so the set starts at 100%).
GENERAL: tuple[QA, ...] = (
    _general("What is the capital of France?", "Paris", "Berlin", "Madrid", "Rome", "Vienna"),
    _general("What is the capital of Italy?", "Rome", "Paris", "Athens", "Lisbon", "Prague"),
    _general("What is the capital of Germany?", "Berlin", "Vienna", "Munich", "Zurich", "Warsaw"),
    _general("What is the capital of the United Kingdom?", "London", "Dublin", "Edinburgh", "Paris", "Oslo"),
    _general("What color is the sky on a clear day?", "blue", "green", "red", "yellow", "purple"),
    _general("Which planet is known as the Red Planet?", "Mars", "Jupiter", "Venus", "Saturn", "Neptune"),
    _general("What is the boiling point of water in degrees Celsius?", "100", "0", "50", "200", "37"),
    _general("What gas do plants absorb from the air?", "carbon dioxide", "oxygen", "helium", "neon", "argon"),
    _general("What is the opposite of up?", "down", "left", "over", "in", "far"),
    _general("What animal is known as the king of the jungle?", "lion", "mouse", "rabbit", "sheep", "frog"),
    _general("What do bees make?", "honey", "milk", "silk", "wool", "bread"),
    _general("Who wrote Romeo and Juliet?", "William Shakespeare", "Charles Dickens", "Mark Twain",
             "Jane Austen", "Leo Tolstoy"),
    _general("What is the chemical symbol for water?", "H2O", "CO2", "NaCl", "O3", "CH4"),
    _general("Which language is mainly spoken in Spain?", "Spanish", "German", "Russian", "Chinese", "Swedish"),
    _general("What is the currency of the United States?", "the dollar", "the euro", "the yen", "the rupee",
             "the peso"),
    _general("What organ pumps blood through the body?", "the heart", "the liver", "the lungs", "the stomach",
             "the brain"),
    _general("How many hours are in a day?", "24", "12", "30", "48", "60"),
    _general("In which continent is Egypt?", "Africa", "Europe", "Asia", "South America", "Australia"),
)
