"""The multi-task demo's steps on real weights and data, on small subsets."""

import pytest

from adapterkit.apps import demo, multitask

pytestmark = pytest.mark.slow


def test_five_tasks_no_forgetting_fusion_merging_storage():
    sizes = multitask.Sizes(train=160, test=100, epochs=1)
    tasks = multitask.load_tasks(sizes)
    assert set(tasks) == set(multitask.TASKS)
    assert {label for _, label in tasks["source"]["train"]} == {0, 1, 2, 3}
    model = multitask.four_way(demo.load_model())
    right_after, after_all, heads = multitask.sequential_adapters(model, tasks, sizes, log=lambda _: None)
    assert after_all == right_after  # exactly: nothing a task uses changed after its training
    merged = multitask.merged(model, heads, tasks)
    assert set(merged) == {"own adapter", "merged_linear", "merged_ties"}
    assert all(0 <= acc <= 1 for accs in merged.values() for acc in accs.values())
    storage = multitask.storage(model)
    assert 85 < storage["base"] < 95 and 1 < storage["adapters"] < 4  # MB: MiniLM vs 5 Pfeiffer adapters + heads
    assert 0 <= multitask.fused(model, heads, tasks, sizes) <= 1
