"""The fictitious fact set: deterministic, well-formed, split by person, answerable by ranking."""

from bench.evaluation import facts


def test_same_seed_same_facts_other_seed_other_facts():
    assert facts.generate(12, seed=3) == facts.generate(12, seed=3)
    assert facts.generate(12, seed=3).people != facts.generate(12, seed=4).people


def test_each_person_has_21_training_pairs_and_7_held_out_paraphrases():
    fs = facts.generate(5, seed=0)
    person = fs.people[0]
    train, held = fs.qa(person), fs.qa(person, held_out=True)
    assert len(train) == 3 * len(facts.ATTRIBUTES) == 21
    assert len(held) == len(facts.ATTRIBUTES) == 7
    assert not {q.question for q in train} & {q.question for q in held}  # held-out questions are never taught
    for q in train + held:
        assert person.name in q.question
        assert q.answer == person.value(q.attribute)
        assert q.answer in q.candidates and len(set(q.candidates)) == facts.N_CANDIDATES
        assert q.prompt == f"Question: {q.question}\nAnswer:"


def test_names_and_books_are_unique_and_split_is_by_person():
    fs = facts.generate(40, seed=1)
    assert len({p.name for p in fs.people}) == 40
    assert len({p.value("book") for p in fs.people}) == 40
    split = fs.split(n_forget=10)
    assert len(split.forget) == 10 and len(split.retain) == 30
    assert not {p.name for p in split.forget} & {p.name for p in split.retain}


def test_candidates_are_stable_across_paraphrases_of_one_fact():
    fs = facts.generate(3, seed=0)
    by_attr = {}
    for q in fs.qa(fs.people[0]) + fs.qa(fs.people[0], held_out=True):
        by_attr.setdefault(q.attribute, set()).add(q.candidates)
    assert all(len(c) == 1 for c in by_attr.values())


def test_general_set_is_well_formed():
    assert len(facts.GENERAL) >= 15
    for q in facts.GENERAL:
        assert q.answer in q.candidates and len(set(q.candidates)) == len(q.candidates) >= 4
