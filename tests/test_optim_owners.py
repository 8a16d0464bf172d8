"""The one longest-processing-time-first owner planner (ZeRO-1's 'owner' partition and FSDP2's 2-D owners)."""
from components.optim.owners import assign_owners, ns_cost
from components.optim.zero1_layout import ParamInfo, plan_layout


def test_ns_cost_counts_each_matrix_of_a_stack_on_its_long_side_once_and_short_side_twice():
    assert ns_cost((8, 32)) == 32 * 8 * 8
    assert ns_cost((32, 8)) == ns_cost((8, 32))
    assert ns_cost((3, 2, 8, 32)) == 6 * ns_cost((8, 32))


def test_longest_job_first_to_the_least_loaded_rank():
    jobs = [(0, 3, 1), (1, 7, 1), (2, 5, 1), (3, 4, 1), (4, 2, 1)]
    # 7 -> r0, 5 -> r1, 4 -> r1 (5 < 7), 3 -> r0 (7 < 9), 2 -> r1 (9 < 10)
    assert assign_owners(jobs, 2) == {1: 0, 2: 1, 3: 1, 0: 0, 4: 1}
    assert assign_owners(jobs, 2, start=[20, 0]) == {1: 1, 2: 1, 3: 1, 0: 1, 4: 1}  # r1 stays below 20


def test_ties_go_to_the_lower_job_and_the_lower_rank():
    assert assign_owners([(5, 1, 1), (2, 1, 1), (9, 1, 1)], 2) == {2: 0, 5: 1, 9: 0}


def test_capacity_keeps_sizes_under_the_cap_and_falls_back_to_the_least_filled_rank():
    jobs = [(0, 10, 6), (1, 9, 6), (2, 1, 6)]
    # cap 7: job 0 -> r0, job 1 -> r1 (r0 full), job 2 fits nowhere -> least size (tie: r0)
    assert assign_owners(jobs, 2, capacity=7) == {0: 0, 1: 1, 2: 0}
    assert assign_owners(jobs, 2) == {0: 0, 1: 1, 2: 1}  # no cap: by cost (r1 has 9 < 10)


def test_zero1_owner_partition_puts_each_muon_parameter_whole_on_its_planned_rank():
    params = [ParamInfo(0, (4, 4), "muon"), ParamInfo(1, (2, 4, 8), "muon"), ParamInfo(2, (6,), "adamw"),
              ParamInfo(3, (8, 8), "muon")]
    layout = plan_layout(params, 2, "owner")
    # cap 75 elements per rank; costs 512 (p3), 256 (p1), 64 (p0): p3 -> r0, p1 -> r1 (r0 would pass the cap),
    # p0 (16 elements) fits under the cap nowhere -> the rank holding fewer elements (tie: r0); shard 64 + 16
    assert layout.shard_size == 80
    for index, rank in {3: 0, 1: 1, 0: 0}.items():
        (piece,) = layout.pieces_of(index)
        assert piece.offset // 80 == (piece.offset + piece.length - 1) // 80 == rank
