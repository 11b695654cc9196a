"""The router: candidates from one shared FAISS search, rollback removes vectors, cost sub-linear in requests."""

import numpy as np
import pytest

from adapters.base import Forget
from adapters.lm.o3 import gate_texts
from bench import known_facts
from bench.evaluation import facts
from detector.gate import fit_gate_from_features, fit_request_gate
from detector.router import Router, RouterConfig


def asked(qas):
    """What a gate is fitted on and the router sees: the questions as users ask them (adapters.lm.o3.gate_texts)."""
    return gate_texts(Forget(qa=tuple((q.question, q.answer) for q in qas)))


def _router_with_people(encoder, fs, people, tmp_path):
    router = Router(encoder)
    for i, person in enumerate(people):
        d = tmp_path / f"a{i}"
        fit_request_gate(asked(fs.qa(person)), d, encoder, adapter_id=f"a{i}")
        router.add(f"a{i}", d)
    return router


def test_routes_each_person_to_its_adapter(encoder, fact_set, tmp_path):
    fs, split = fact_set
    router = _router_with_people(encoder, fs, split.forget, tmp_path)
    held = [asked(fs.qa(p, held_out=True))[0] for p in split.forget]  # birthplace paraphrase of each
    routes = router.route(held + asked(facts.GENERAL[:4]))
    for i, r in enumerate(routes[:3]):
        assert set(r) == {f"a{i}"}, r
    assert routes[3:] == [{}] * 4
    # Every text a request named routes to its adapter, the 20 % held out for calibration included.
    for i, person in enumerate(split.forget):
        assert all(f"a{i}" in r for r in router.route(asked(fs.qa(person)))), person.name
    expl = router.explain(held[0])
    assert expl["applied"] and "a0" in expl["applied"] and expl["candidates"][0]["adapter_id"] == "a0"
    assert len(expl["candidates"][0]["layer_scores"]) == len(router.gates[expl["candidates"][0]["adapter_id"]].layers)


def test_a_router_with_no_adapter_routes_nothing_without_encoding(encoder, fact_set, tmp_path):
    """Until the first forget request (and after the last rollback) serving must cost what the base model costs."""
    encoded = []

    class Watched:
        dim, n_layers = encoder.dim, encoder.n_layers

        def encode(self, texts):
            encoded.append(list(texts))
            return encoder.encode(texts)

    fs, split = fact_set
    router = Router(Watched())
    question = asked(fs.qa(split.forget[0]))[0]
    assert router.route([question, "Hello"]) == [{}, {}] and encoded == []
    fit_request_gate(asked(fs.qa(split.forget[0])), tmp_path / "a0", encoder, adapter_id="a0")
    router.add("a0", tmp_path / "a0")
    assert list(router.route([question])[0]) == ["a0"] and encoded == [[question]]
    router.remove("a0")
    assert router.route([question]) == [{}] and len(encoded) == 1


def test_rollback_removes_vectors_and_state(encoder, fact_set, tmp_path):
    fs, split = fact_set
    router = _router_with_people(encoder, fs, split.forget[:2], tmp_path)
    before = router.n_vectors
    n_a0 = router.gates["a0"].banks[0].ntotal
    q = asked(fs.qa(split.forget[0]))[:2]
    assert all("a0" in r for r in router.route(q))
    assert router.remove("a0") == n_a0
    assert router.n_vectors == before - n_a0 and "a0" not in router.gates
    assert all("a0" not in c for c in router.candidates(encoder.encode(q)))
    assert all("a0" not in r for r in router.route(q))
    router.add("a0", tmp_path / "a0")  # restore: back exactly as before
    assert router.n_vectors == before and all("a0" in r for r in router.route(q))


def test_search_cost_sublinear_in_requests(encoder, fact_set):
    """The work per input stays flat while the requests grow 40x: the shared search narrows 400 requests to the
    same handful of candidate gates as 10 (bench/router.py times 1,000 against 10; a test does not time).

    A synthetic request = 8 real question embeddings shifted by a per-request offset (a distinct cluster,
    like a distinct person) plus jitter; the probes are the real held-out questions of a real request and
    general questions, so the candidates per input stay few while the number of requests grows 40x.
    """
    fs, split = fact_set
    base = encoder.encode(asked(fs.qa_of(fs.people)))  # 12 people x 21 questions
    rng = np.random.default_rng(0)
    probe = encoder.encode(asked(fs.qa(split.forget[0], held_out=True)) + asked(facts.GENERAL[:9]))

    real = fit_gate_from_features(encoder.encode(asked(fs.qa(split.forget[0]))), "real")

    def build(n):
        router = Router(encoder)
        router.add_gate("real", real)
        for i in range(n - 1):
            rows = rng.choice(len(base), 8, replace=False)
            offset = rng.normal(0, 0.3, (1, 1, base.shape[2]))
            feats = base[rows] + offset + rng.normal(0, 0.05, base[rows].shape)
            router.add_gate(f"s{i}", fit_gate_from_features(feats.astype(np.float32), f"s{i}"))
        return router

    small, large = build(10), build(400)
    assert large.n_vectors == real.banks[0].ntotal + 399 * 8  # every sample of a synthetic request
    n_cand = np.mean([len(c) for c in large.candidates(probe)])
    assert n_cand < 5, n_cand  # the shared search narrows 400 requests to a handful
    routes = large.route_features(probe)
    assert sum("real" in r for r in routes[:7]) >= 5 and routes[7:] == [{}] * 9  # held-out hit rate ~86%
    n_cand_small = np.mean([len(c) for c in small.candidates(probe)])
    assert n_cand <= n_cand_small + 2, (n_cand_small, n_cand)  # 40x the requests, about the same gates scored


def test_look_alike_questions_about_other_people_stay_on_the_base_model(encoder, tmp_path):
    """The failure that matters in serving: a question with a forgotten person's template but about someone
    else. Each gate errs on its own, so errors add up over requests; 20 requests here, every retained
    person's questions (training and held-out paraphrases) as look-alikes. The default last-layer gate keeps
    them off every adapter while still routing the forgotten people's held-out paraphrases; the gate over
    all six layers (O3's aggregation) is the measured reason for that default."""
    fs = facts.generate(30, seed=5)
    split = fs.split(n_forget=20)
    look_alikes = encoder.encode(asked(fs.qa_of(split.retain)) + asked(fs.qa_of(split.retain, held_out=True)))
    train = {p.name: encoder.encode(asked(fs.qa(p))) for p in split.forget}
    held = {p.name: encoder.encode(asked(fs.qa(p, held_out=True))) for p in split.forget}

    def rates(layers):
        router = Router(encoder)
        for i, p in enumerate(split.forget):
            router.add_gate(f"a{i}", fit_gate_from_features(train[p.name], f"a{i}", layers=layers))
        false_activation = np.mean([bool(r) for r in router.route_features(look_alikes)])
        hit = np.mean([f"a{i}" in r for i, p in enumerate(split.forget) for r in router.route_features(held[p.name])])
        return false_activation, hit

    fa_last, hit_last = rates((-1,))
    fa_all, hit_all = rates(None)
    assert fa_last <= 0.02, fa_last
    assert hit_last >= 0.7, hit_last
    # On bare questions (what serving routes) all six layers erred less than on templated prompts, whose shared
    # layout the lexical lower layers pick up; the last layer is still no worse.
    assert fa_last <= fa_all, (fa_all, fa_last)


def test_margin_keeps_look_alikes_off_with_many_requests_and_named_texts_always_route(encoder):
    """100 requests: alone, some gate accepts a look-alike question now and then, and those errors add up.
    The router's margin (an input must be clearly nearer to the firing request than to requests whose gates
    stay off) removes most of them, costs no held-out paraphrase, and every named text still routes."""
    fs = facts.generate(130, seed=11)
    split = fs.split(n_forget=100)
    train = [encoder.encode(asked(fs.qa(p))) for p in split.forget]
    held = [encoder.encode(asked(fs.qa(p, held_out=True))) for p in split.forget]
    look_alikes = encoder.encode(asked(fs.qa_of(split.retain)) + asked(fs.qa_of(split.retain, held_out=True)))
    router = Router(encoder, RouterConfig(min_weight=0.4))  # the lower cut of the sweep: most for the margin to do
    for i, t in enumerate(train):
        router.add_gate(f"a{i}", fit_gate_from_features(t, f"a{i}"))

    def rates(margin):
        router.config.margin = margin
        fa = np.mean([bool(r) for r in router.route_features(look_alikes)])
        hit = np.mean([f"a{i}" in r for i, h in enumerate(held) for r in router.route_features(h)])
        named = np.mean([f"a{i}" in r for i, t in enumerate(train) for r in router.route_features(t)])
        return fa, hit, named

    fa_off, hit_off, _ = rates(0.0)
    fa_on, hit_on, named_on = rates(RouterConfig().margin)
    assert fa_off > 0.01, fa_off  # the failure the margin is for (1.5 % of look-alikes without it)
    assert fa_on < fa_off / 3, (fa_on, fa_off)
    assert hit_on >= hit_off - 0.02, (hit_on, hit_off)
    assert named_on == 1.0


def test_requests_about_the_same_person_do_not_block_each_other(encoder):
    """Two requests naming different facts of one person: each question about that person is near both, so
    the margin must not let one request's silence block the other's adapter. Paraphrases route to the request
    that named their fact about as often with the margin as without it (on bare questions, as serving routes
    them, it cost 1 of 21 here: the price of the margin's cut in look-alike false activations)."""
    fs = facts.generate(12, seed=0)
    router = Router(encoder)
    owner = {}
    for k, person in enumerate(fs.people[:3]):
        attrs = [a for a, _ in person.facts]
        for part, name in ((attrs[:4], f"p{k}-first"), (attrs[4:], f"p{k}-second")):
            texts = asked([q for q in fs.qa(person) if q.attribute in part])
            router.add_gate(name, fit_gate_from_features(encoder.encode(texts), name))
            owner |= {(person.name, a): name for a in part}
    held = [q for p in fs.people[:3] for q in fs.qa(p, held_out=True)]
    feats = encoder.encode(asked(held))

    def hit(margin):
        router.config.margin = margin
        return np.mean(
            [owner[(q.person, q.attribute)] in r for q, r in zip(held, router.route_features(feats), strict=True)]
        )

    with_margin, without = hit(RouterConfig().margin), hit(0.0)
    assert with_margin >= 0.6, with_margin
    assert with_margin >= without - 0.05, (with_margin, without)


def test_the_same_question_about_something_else_is_not_routed_but_a_paraphrase_is(encoder):
    """Support (detector/router.py): "How many legs does a dog have?" is near the ONE text of a request about spiders
    written in its template; a paraphrase about spiders is near several of them."""
    fam = next(f for f in known_facts.ROUTING_TUNING if f.name == "legs")
    gate = fit_gate_from_features(encoder.encode([fam.ask(t, "spider") for t in fam.sent]), "spider")
    look = [fam.ask(t, e) for e in fam.entities if e != "spider" for t in fam.sent + fam.held_out]
    held = [fam.ask(t, "spider") for t in fam.held_out]

    def routed(config, questions):
        router = Router(encoder, config)
        router.add_gate("spider", gate)
        return [bool(r) for r in router.route(questions)]

    assert sum(routed(RouterConfig(min_support=0.0), look)) >= 3  # the template alone routes them without support
    assert not any(routed(RouterConfig(), look))
    assert all(routed(RouterConfig(), held))
    assert all(routed(RouterConfig(), [fam.ask(t, "spider") for t in fam.sent]))  # its own texts, as sent


@pytest.mark.skipif(
    not hasattr(__import__("faiss"), "StandardGpuResources") or not __import__("torch").cuda.is_available(),
    reason="needs faiss-gpu and a CUDA GPU",
)
def test_gpu_search_copy_finds_the_same_ids_and_follows_rollbacks():
    import faiss
    import numpy as np

    from detector import index as fidx

    rng = np.random.default_rng(0)
    cpu = fidx.new_index(16)
    for key in (1, 2, 3):
        fidx.add_request(cpu, key, fidx.normalise(rng.normal(size=(50, 16))))
    q = fidx.normalise(rng.normal(size=(5, 16)))
    assert faiss.get_num_gpus() > 0
    for removed in (None, 2):  # before and after a rollback of request 2 (done on the CPU index, then copied)
        if removed is not None:
            assert fidx.remove_request(cpu, removed) == 50
        copy = fidx.gpu_search_copy(cpu, 0)
        s_cpu, i_cpu = cpu.search(q, 10)
        s_gpu, i_gpu = copy.search(q, 10)
        assert np.array_equal(i_cpu, i_gpu) and np.allclose(s_cpu, s_gpu, atol=1e-5)
    assert 2 not in set(fidx.key_of(i_gpu).ravel())
