import itertools
import random

import pytest

from kvconvert.merge import grouping


@pytest.mark.parametrize(("n", "g"), [(4, 2), (6, 3), (9, 3), (8, 4)])
def test_partitions_enumerates_every_partition_once(n, g):
    parts = [tuple(sorted(p)) for p in grouping.partitions(list(range(n)), g)]
    assert len(parts) == len(set(parts)) == grouping.partition_count(n, g)
    assert all(sorted(itertools.chain(*p)) == list(range(n)) for p in parts)


def planted_cost(labels):
    def costs(groups):
        return [len({labels[h] for h in group}) - 1 + 0.01 * sum(group) / 100 for group in groups]

    return costs


@pytest.mark.parametrize(("n", "g"), [(9, 3), (16, 2), (16, 4), (24, 3)])
def test_search_recovers_planted_groups(n, g):
    rng = random.Random(n * g)
    labels = [i // g for i in range(n)]
    rng.shuffle(labels)
    found = grouping.search_groups(n, g, planted_cost(labels))
    assert all(len({labels[h] for h in grp}) == 1 for grp in found)


def test_search_is_never_worse_than_adjacent_and_deterministic():
    rng = random.Random(0)
    table = {}

    def cost(group):
        key = tuple(sorted(group))
        if key not in table:
            table[key] = rng.random()
        return table[key]

    def costs(groups):
        return [cost(g) for g in groups]

    first = grouping.search_groups(16, 4, costs)
    assert sum(map(cost, first)) <= sum(map(cost, grouping.adjacent_groups(16, 4)))
    assert grouping.search_groups(16, 4, costs) == first


def test_chain_order_visits_every_head():
    labels = [0, 1, 0, 1, 2, 2]
    order = grouping.chain_order(6, planted_cost(labels))
    assert sorted(order) == list(range(6))
