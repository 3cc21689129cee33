import itertools
import random

import pytest

from pipeline import search
from pipeline.errors import BadInput
from pipeline.search import Option, SearchSpec


def test_the_hull_keeps_the_options_no_mix_of_two_others_beats():
    options = [Option("a", 10, 1.0), Option("b", 20, 0.5), Option("c", 30, 0.45), Option("d", 40, 0.1),
               Option("e", 25, 0.9)]   # e: more bytes than b and more damage: dominated
    # c lies above the segment from b to d: upgrading straight to d removes more per byte
    assert [o.type for o in search.hull(options)] == ["a", "b", "d"]


def random_groups(rng: random.Random, count: int) -> dict[str, list[Option]]:
    groups = {}
    for index in range(count):
        sizes = sorted(rng.sample(range(10, 200), 4))
        damages = sorted((rng.random() for _ in sizes), reverse=True)
        groups[f"g{index}"] = [Option(f"t{k}", size, damage) for k, (size, damage) in enumerate(zip(sizes, damages))]
    return groups


def brute_force(groups, budget):
    best = None
    for picks in itertools.product(*groups.values()):
        if sum(o.bytes for o in picks) <= budget:
            damage = sum(o.damage for o in picks)
            best = damage if best is None else min(best, damage)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_a_size_budget_is_kept_and_the_choice_is_near_the_exact_optimum(seed):
    rng = random.Random(seed)
    groups = random_groups(rng, 5)
    smallest = sum(options[0].bytes for options in groups.values())
    largest = sum(options[-1].bytes for options in groups.values())
    budget = rng.uniform(smallest, largest)
    choice = search.within_bytes(groups, budget)
    assert sum(o.bytes for o in choice.values()) <= budget
    damage = sum(o.damage for o in choice.values())
    optimum = brute_force(groups, budget)
    assert damage >= optimum - 1e-12
    # the LP order plus the fill: never more than one group's largest step from the optimum
    assert damage - optimum <= max(o[0].damage - o[-1].damage for o in groups.values())
    # and no single change that fits would lower the damage
    used = sum(o.bytes for o in choice.values())
    for name, options in groups.items():
        for option in options:
            if used - choice[name].bytes + option.bytes <= budget:
                assert option.damage >= choice[name].damage


def test_the_ends_of_the_size_budget():
    groups = random_groups(random.Random(7), 6)
    smallest = sum(options[0].bytes for options in groups.values())
    largest = sum(options[-1].bytes for options in groups.values())
    assert search.within_bytes(groups, smallest - 1) is None
    assert {name: o.type for name, o in search.within_bytes(groups, smallest).items()} == {n: "t0" for n in groups}
    assert {name: o.type for name, o in search.within_bytes(groups, largest).items()} == {n: "t3" for n in groups}


def test_a_damage_budget_takes_the_first_choice_along_the_path_within_it():
    groups = random_groups(random.Random(3), 6)
    least = sum(options[-1].damage for options in groups.values())
    most = sum(options[0].damage for options in groups.values())
    target = (least + most) / 2
    choice = search.within_damage(groups, target)
    assert sum(o.damage for o in choice.values()) <= target
    assert search.within_damage(groups, least / 2) is None
    assert {o.type for o in search.within_damage(groups, most).values()} == {"t0"}


def measured(groups):
    return {"unquantized_type": "F16", "weights": 1000,
            "groups": [{"name": name, "options": {o.type: {"bytes": o.bytes, "mean_kld": o.damage} for o in options}}
                       for name, options in groups.items()]}


def test_solve_refuses_a_budget_no_choice_meets_naming_the_key():
    groups = {"g": [Option("F16", 100, 0.0), Option("Q8_0", 50, 0.01)]}
    with pytest.raises(BadInput) as refused:
        search.solve(SearchSpec(bits_per_weight=0.1), measured(groups), 10, where="recipes/x.yaml: search")
    assert refused.value.where == "recipes/x.yaml: search.bits_per_weight"
    with pytest.raises(BadInput):
        search.solve(SearchSpec(max_mean_kld=0.001), measured({"g": [Option("Q8_0", 50, 0.01)]}), None, where="w")


def test_solve_keeps_to_the_types_the_spec_allows_and_the_unquantized_one():
    groups = {"g": [Option("F16", 100, 0.0), Option("Q8_0", 50, 0.01), Option("Q5_0", 30, 0.05)]}
    choice = search.solve(SearchSpec(bits_per_weight=1, types=["q5_0"]), measured(groups), 60, where="w")
    assert choice["g"].type == "Q5_0"
    choice = search.solve(SearchSpec(bits_per_weight=1, types=["q5_0"]), measured(groups), 100, where="w")
    assert choice["g"].type == "F16"


def test_a_search_spec_takes_exactly_one_budget():
    with pytest.raises(ValueError):
        SearchSpec()
    with pytest.raises(ValueError):
        SearchSpec(bits_per_weight=5, max_mean_kld=0.1)
