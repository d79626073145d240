"""The memory budget a trial worker keeps embeddings within: per node, shared by its workers."""

import os

from trainables.residency import RESIDENT_NODE_FRACTION, Residency, node_memory_bytes

PHYSICAL = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_the_node_memory_is_the_cgroup_limit_where_one_is_set(tmp_path):
    limit = tmp_path / "memory.max"
    limit.write_text(f"{PHYSICAL // 4}\n")
    assert node_memory_bytes([tmp_path / "absent", limit]) == PHYSICAL // 4
    limit.write_text("max\n")  # cgroup v2 without a limit
    assert node_memory_bytes([limit]) == PHYSICAL
    limit.write_text(f"{2 ** 62}\n")  # cgroup v1's "no limit" is a huge number
    assert node_memory_bytes([limit]) == PHYSICAL


def test_the_workers_on_a_node_share_its_budget():
    node = 64 << 30
    assert Residency(workers_per_node=1, node_bytes=node).budget == int(RESIDENT_NODE_FRACTION * node)
    assert Residency(workers_per_node=4, node_bytes=node).budget == int(RESIDENT_NODE_FRACTION * node / 4)
    assert Residency(workers_per_node=0, node_bytes=node).budget == int(RESIDENT_NODE_FRACTION * node)
