"""Traffic: weighted splits, sticky keys, shadows, epsilon-greedy and Thompson sampling."""

from __future__ import annotations

import random
from collections import Counter

import orjson
import pytest

from skyloop.deploy.spec import RouterSpec
from skyloop.deploy.traffic import Traffic
from skyloop.errors import SpecError

WEIGHTED = RouterSpec()
GREEDY = RouterSpec(type="epsilon_greedy", epsilon=0.1)
THOMPSON = RouterSpec(type="thompson")


def draws(traffic: Traffic, n: int) -> Counter[str]:
    return Counter(traffic.choose() for _ in range(n))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_split_follows_weights(seed: int) -> None:
    traffic = Traffic(WEIGHTED, {"stable": 70, "canary": 20, "other": 10}, rng=random.Random(seed))
    counts = draws(traffic, 20_000)
    for name, share in {"stable": 0.7, "canary": 0.2, "other": 0.1}.items():
        assert counts[name] / 20_000 == pytest.approx(share, abs=0.02)
    assert traffic.arms()["canary"] == {"pulls": counts["canary"], "weight": 20.0}


def test_weight_zero_is_never_chosen() -> None:
    traffic = Traffic(WEIGHTED, {"stable": 100, "canary": 0}, rng=random.Random(0))
    assert set(draws(traffic, 5_000)) == {"stable"}
    assert {traffic.choose(sticky=f"user-{i}") for i in range(2_000)} == {"stable"}


def test_weights_need_not_add_up_to_100() -> None:
    traffic = Traffic(WEIGHTED, {"a": 1, "b": 3}, rng=random.Random(0))
    assert draws(traffic, 20_000)["b"] / 20_000 == pytest.approx(0.75, abs=0.02)


def test_sticky_keys_are_stable_and_spread_by_weight() -> None:
    weights = {"stable": 90, "canary": 10}
    traffic = Traffic(WEIGHTED, weights, rng=random.Random(0))
    keys = [f"session-{i}" for i in range(20_000)]
    first = {key: traffic.choose(sticky=key) for key in keys}
    # Same answer again, and from a fresh router with another rng (as in another process).
    again = Traffic(WEIGHTED, weights, rng=random.Random(99))
    assert all(traffic.choose(sticky=key) == first[key] for key in keys)
    assert all(again.choose(sticky=key) == first[key] for key in keys)
    assert Counter(first.values())["canary"] / len(keys) == pytest.approx(0.10, abs=0.015)


def test_sticky_clients_on_a_growing_canary_stay_there() -> None:
    traffic = Traffic(WEIGHTED, {"stable": 90, "canary": 10})
    keys = [f"k{i}" for i in range(10_000)]
    before = {key: traffic.choose(sticky=key) for key in keys}
    traffic.set_weights({"stable": 50, "canary": 50})
    after = {key: traffic.choose(sticky=key) for key in keys}
    assert all(after[key] == "canary" for key in keys if before[key] == "canary")
    assert Counter(after.values())["canary"] / len(keys) == pytest.approx(0.5, abs=0.02)


def test_mirrors_follow_shadow_fractions() -> None:
    traffic = Traffic(WEIGHTED, {"stable": 100}, shadows={"mirror": 0.2, "all": 1.0, "none": 0.0},
                      rng=random.Random(3))
    counts: Counter[str] = Counter()
    for _ in range(20_000):
        counts.update(traffic.mirrors())
    assert counts["all"] == 20_000
    assert counts["none"] == 0
    assert counts["mirror"] / 20_000 == pytest.approx(0.2, abs=0.015)
    traffic.set_shadows({})
    assert traffic.mirrors() == []


def bernoulli_run(traffic: Traffic, p: dict[str, float], events: int, rng: random.Random) -> list[str]:
    chosen = []
    for _ in range(events):
        name = traffic.choose()
        traffic.reward(name, 1.0 if rng.random() < p[name] else 0.0)
        chosen.append(name)
    return chosen


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_epsilon_greedy_converges_to_the_better_arm(seed: int) -> None:
    traffic = Traffic(GREEDY, {"good": 50, "bad": 50}, rng=random.Random(seed))
    chosen = bernoulli_run(traffic, {"good": 0.8, "bad": 0.3}, 3_000, random.Random(seed + 100))
    assert chosen[-1_000:].count("good") >= 850  # about 1 - epsilon/2 = 95%


def test_epsilon_greedy_leaves_unrewarded_arms_to_exploration() -> None:
    greedy = Traffic(RouterSpec(type="epsilon_greedy", epsilon=0.0), {"a": 0, "b": 0, "c": 0},
                     rng=random.Random(5))
    assert set(draws(greedy, 200)) == {"a", "b", "c"}  # nothing rewarded yet: every arm is as good
    greedy.reward("b", 0.0)
    assert set(draws(greedy, 200)) == {"b"}  # the only arm known, however bad, until another is rewarded
    greedy.reward("a", 1.0)
    assert set(draws(greedy, 200)) == {"a"}
    exploring = Traffic(RouterSpec(type="epsilon_greedy", epsilon=0.3), {"a": 0, "b": 0, "c": 0},
                        rng=random.Random(5))
    exploring.reward("a", 0.2)
    exploring.reward("b", 0.1)
    # c has had no feedback (it is new, or its feedback is on its way): it gets its share of exploration only.
    assert draws(exploring, 20_000)["c"] / 20_000 == pytest.approx(0.1, abs=0.015)


@pytest.mark.parametrize(("router", "most"), [(GREEDY, 0.1), (THOMPSON, 0.03)])
def test_an_arm_whose_every_answer_fails_loses_its_traffic(router: RouterSpec, most: float) -> None:
    traffic = Traffic(router, {"broken": 0, "good": 0}, rng=random.Random(1))
    rng = random.Random(0)
    chosen = []
    for _ in range(5_000):
        name = traffic.choose()
        if name == "broken":
            traffic.fail(name)  # a 5xx: no answer, so no feedback
        else:
            traffic.reward(name, 1.0 if rng.random() < 0.9 else 0.0)
        chosen.append(name)
    assert chosen[-2_000:].count("broken") / 2_000 <= most
    broken = traffic.arms()["broken"]
    assert broken["errors"] == broken["pulls"] == chosen.count("broken") and broken["feedback"] == 0
    assert broken["mean_reward"] == 0.0


def test_epsilon_greedy_explores_epsilon_of_requests() -> None:
    traffic = Traffic(RouterSpec(type="epsilon_greedy", epsilon=0.2), {"a": 0, "b": 0}, rng=random.Random(5))
    traffic.reward("a", 1.0)
    traffic.reward("b", 0.0)
    # b's mean is 0, a's is 1: b is chosen only when exploring picks it, half of epsilon.
    assert draws(traffic, 20_000)["b"] / 20_000 == pytest.approx(0.1, abs=0.015)


def test_epsilon_greedy_breaks_ties_at_random() -> None:
    traffic = Traffic(RouterSpec(type="epsilon_greedy", epsilon=0.0), {"a": 1, "b": 1}, rng=random.Random(0))
    traffic.reward("a", 0.5)
    traffic.reward("b", 0.5)
    assert draws(traffic, 4_000)["a"] / 4_000 == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_thompson_finds_the_better_arm(seed: int) -> None:
    traffic = Traffic(THOMPSON, {"good": 0, "bad": 0}, rng=random.Random(seed))
    chosen = bernoulli_run(traffic, {"good": 0.9, "bad": 0.6}, 2_000, random.Random(seed + 100))
    assert chosen[-1_000:].count("good") >= 800


def test_thompson_fractional_rewards_are_clipped_probabilities() -> None:
    traffic = Traffic(THOMPSON, {"a": 0}, rng=random.Random(0))
    for value in (0.25, 2.0, -1.0):
        traffic.reward("a", value)
    assert traffic.arms()["a"] == {"pulls": 0, "feedback": 3, "errors": 0, "mean_reward": pytest.approx(1.25 / 3),
                                   "alpha": 2.25, "beta": 2.75}


def test_set_weights_keeps_stats_of_arms_that_stay() -> None:
    traffic = Traffic(THOMPSON, {"a": 0, "b": 0}, rng=random.Random(0))
    traffic.reward("a", 1.0)
    traffic.reward("b", 0.0)
    traffic.set_weights({"a": 0, "c": 0})
    arms = traffic.arms()
    assert set(arms) == {"a", "c"}
    assert arms["a"]["alpha"] == 2.0
    assert arms["c"] == {"pulls": 0, "feedback": 0, "errors": 0, "mean_reward": None, "alpha": 1.0, "beta": 1.0}
    traffic.set_weights({"a": 0, "b": 0})
    assert traffic.arms()["b"]["feedback"] == 0  # a removed arm comes back fresh


def test_rewards_ignored_for_unknown_predictors_and_the_weighted_router() -> None:
    bandit = Traffic(GREEDY, {"a": 0}, rng=random.Random(0))
    bandit.reward("ghost", 1.0)
    bandit.reward("a", float("nan"))
    bandit.reward("a", 1e308)  # beyond MAX_REWARD: two of them made the arm's sum, and its mean, infinite
    bandit.reward("a", 1e308)
    bandit.fail("ghost")
    assert set(bandit.arms()) == {"a"}
    assert bandit.arms()["a"]["feedback"] == 0
    bandit.reward("a", -1e12)  # the bound itself is taken
    assert bandit.arms()["a"]["mean_reward"] == -1e12
    weighted = Traffic(WEIGHTED, {"a": 100})
    weighted.reward("a", 1.0)
    weighted.fail("a")
    assert weighted.arms() == {"a": {"pulls": 0, "weight": 100.0}}


@pytest.mark.parametrize("router", [GREEDY, THOMPSON])
def test_bandit_sticky_keys_stay_until_their_arm_goes(router: RouterSpec) -> None:
    traffic = Traffic(router, {"a": 0, "b": 0, "c": 0}, rng=random.Random(0))
    picks = {f"u{i}": traffic.choose(sticky=f"u{i}") for i in range(300)}
    assert all(traffic.choose(sticky=key) == arm for key, arm in picks.items())
    traffic.set_weights({"b": 0, "c": 0})
    moved = {key: traffic.choose(sticky=key) for key in picks}
    assert all(arm in {"b", "c"} for arm in moved.values())
    assert all(moved[key] == arm for key, arm in picks.items() if arm != "a")


def test_bandit_sticky_keys_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import skyloop.deploy.traffic as module

    monkeypatch.setattr(module, "STICKY_KEYS", 10)
    traffic = Traffic(GREEDY, {"a": 0, "b": 0}, rng=random.Random(0))
    for i in range(50):
        traffic.choose(sticky=f"u{i}")
    assert len(traffic._sticky) == 10
    assert list(traffic._sticky) == [f"u{i}" for i in range(40, 50)]


@pytest.mark.parametrize(
    ("router", "weights", "message"),
    [
        (WEIGHTED, {}, "no predictors"),
        (GREEDY, {}, "no predictors"),
        (WEIGHTED, {"a": 0, "b": 0}, "every weight is 0"),
        (WEIGHTED, {"a": 100, "b": -1}, "'b'"),
        (THOMPSON, {"a": -5}, "0 or more"),
        (WEIGHTED, {"a": float("nan")}, "0 or more"),
    ],
)
def test_bad_weights_raise_spec_error(router: RouterSpec, weights: dict[str, float], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        Traffic(router, weights)
    traffic = Traffic(router, {"ok": 100})
    with pytest.raises(SpecError, match=message):
        traffic.set_weights(weights)
    assert traffic.choose() == "ok"  # a rejected update leaves the router as it was


def test_bandits_accept_all_zero_weights_and_bad_shadows_raise() -> None:
    assert Traffic(THOMPSON, {"a": 0, "b": 0}).choose() in {"a", "b"}
    with pytest.raises(SpecError, match="shadow fraction of 'm'"):
        Traffic(WEIGHTED, {"a": 100}, shadows={"m": 1.5})


@pytest.mark.parametrize("router", [GREEDY, THOMPSON])
def test_a_sticky_key_leaves_an_arm_learned_to_be_clearly_worse(router: RouterSpec) -> None:
    # Keys handed out while the bandit knew nothing stayed on the arm that always fails, for good.
    traffic = Traffic(router, {"good": 0, "bad": 0}, rng=random.Random(3))
    users = [f"u{i}" for i in range(20)]
    first = {user: traffic.choose(sticky=user) for user in users}
    assert "bad" in first.values()
    served: Counter[str] = Counter()
    for _ in range(40):
        for user in users:
            arm = traffic.choose(sticky=user)
            served[arm] += 1
            traffic.reward(arm, 1.0 if arm == "good" else 0.0)
    assert served["bad"] <= 40, served  # each key on it left once the bad arm was known (about 10 rewards)
    assert all(traffic.choose(sticky=user) == "good" for user in users)


def test_a_sticky_key_stays_while_its_arm_is_not_clearly_worse() -> None:
    traffic = Traffic(THOMPSON, {"a": 0, "b": 0}, rng=random.Random(0))
    picks = {f"u{i}": traffic.choose(sticky=f"u{i}") for i in range(100)}
    for i in range(20):  # 0.9 against 0.8 over 20 rewards each: within the noise
        traffic.reward("a", float(i % 10 != 0))
        traffic.reward("b", float(i % 5 != 0))
    assert all(traffic.choose(sticky=key) == arm for key, arm in picks.items())


@pytest.mark.parametrize("router", [GREEDY, THOMPSON])
def test_a_new_traffic_takes_up_what_the_saved_arms_had_learned(router: RouterSpec) -> None:
    # A controller restart started every bandit from its prior, handing arms known to be bad a large share.
    before = Traffic(router, {"good": 0, "bad": 0}, rng=random.Random(0))
    bernoulli_run(before, {"good": 0.9, "bad": 0.1}, 500, random.Random(1))
    before.fail("bad")
    saved = orjson.loads(orjson.dumps(before.arms()))  # as the deployment's state stores them
    after = Traffic(router, {"good": 0, "bad": 0, "new": 0}, rng=random.Random(0))
    after.seed(saved)
    for name in ("good", "bad"):
        assert after.arms()[name] == pytest.approx(saved[name])
    assert after.arms()["new"]["feedback"] == 0
    chosen = draws(Traffic(router, {"good": 0, "bad": 0}, rng=random.Random(0)), 200)
    assert chosen["bad"] > 40  # fresh: the prior sends the bad arm a large share
    seeded = Traffic(router, {"good": 0, "bad": 0}, rng=random.Random(0))
    seeded.seed(saved)
    assert draws(seeded, 200)["bad"] < 25


def test_seeding_ignores_what_it_cannot_use() -> None:
    traffic = Traffic(THOMPSON, {"a": 0, "b": 0, "c": 0}, rng=random.Random(0))
    traffic.seed({"ghost": {"feedback": 5, "mean_reward": 1.0}, "a": "junk",
                  "b": {"pulls": -3, "feedback": float("nan"), "mean_reward": None},
                  "c": {"pulls": 9, "feedback": 4, "errors": 0, "mean_reward": 0.5}})  # saved by epsilon_greedy
    arms = traffic.arms()
    assert arms["a"]["feedback"] == 0 and arms["b"] == {**arms["b"], "pulls": 0, "feedback": 0}
    assert arms["c"] == {"pulls": 9, "feedback": 4, "errors": 0, "mean_reward": 0.5, "alpha": 3.0, "beta": 3.0}
    weighted = Traffic(WEIGHTED, {"a": 100})
    weighted.seed({"a": {"pulls": 5, "feedback": 5, "mean_reward": 1.0}})
    assert weighted.arms() == {"a": {"pulls": 0, "weight": 100.0}}
