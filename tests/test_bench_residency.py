"""bench/residency.py and residency_policies.py: the budget list and the cache policies' replay, by hand."""
import numpy as np

from bench.residency import budgets
from bench.residency_policies import hit_rate
from mobilemoe.config import MobileMoEConfig


def test_budgets_are_shares_of_all_experts_or_the_minimum():
    cfg = MobileMoEConfig.from_name("test-moe")  # 2 MoE layers x 8 experts, top-2
    assert budgets(cfg, ["1", "0.5", "0.05", "min"]) == [("100%", 16), ("50%", 8), ("5%", 2), ("min", 2)]


def test_lru_pinned_and_lfu_replay_by_hand():
    # one layer, top-1, 2 slots: requests 0 1 0 2 0 1
    trace = [np.array([[0], [1], [0], [2], [0], [1]])]
    # lru: miss miss hit miss(evicts 1) hit miss(evicts 2) -> 2 hits of 6
    assert hit_rate(trace, 2, set()) == 2 / 6
    # expert 0 pinned, 1 LRU slot: miss(1) hit miss(2) hit miss(1) + the first 0 hit -> 3 of 6
    assert hit_rate(trace, 2, {(0, 0)}) == 3 / 6
    # lfu: 2 evicts 1 (used once; 0 twice), the last 1 evicts 2 (once; 0 three times) -> 2 hits
    assert hit_rate(trace, 2, set(), "lfu") == 2 / 6
    # two layers share the slots: layer 1 requests evict layer 0's experts
    two = [np.array([[0], [0]]), np.array([[1], [1]])]
    assert hit_rate(two, 1, set()) == 0 and hit_rate(two, 2, set()) == 2 / 4
