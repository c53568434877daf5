"""The token budget of a step that preempts: what a preempted request had been given is spent on others.

Driven through the Scheduler's public methods and the fake runner (tests/core/fake_runner.py), which
checks the budget, block tables and KV contents after every step.
"""

from pagedllm.core.request import RequestStatus
from tests.core.fake_runner import Driver, expected_chain, make_request, make_scheduler

BUDGET = 16


def test_preempting_step_still_schedules_the_full_budget():
    # Priority policy: the low-priority request "low" runs first and is scheduled first in step 5,
    # then "urgent" needs a block while none is free and preempts it. The token "low" had been
    # given must go back to the step, so the chunked prefill of "long" gets all that is left.
    sched = make_scheduler(num_blocks=14, budget=BUDGET, policy="priority")
    low = make_request("low", list(range(100, 138)), priority=1, arrival=0.0, max_tokens=3)  # 38 tokens
    sched.add_request(low)
    drv = Driver(sched)
    assert [drv.step().num_scheduled_tokens for _ in range(3)] == [{"low": 16}, {"low": 16}, {"low": 6}]
    assert low.num_tokens == 39  # its prompt in 10 blocks, one token sampled

    sched.add_request(make_request("urgent", [1, 2, 3, 4], priority=0, arrival=1.0, max_tokens=5))
    sched.add_request(make_request("long", list(range(200, 240)), priority=0, arrival=2.0, max_tokens=3))
    assert drv.step().num_scheduled_tokens == {"low": 1, "urgent": 4, "long": 11}
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == 0

    step = drv.step()  # "urgent" needs a fifth-token block: "low" (already scheduled) is preempted
    assert step.preempted_req_ids == {"low"} and low.status == RequestStatus.PREEMPTED
    assert step.num_scheduled_tokens == {"urgent": 1, "long": BUDGET - 1}
    assert step.total_num_scheduled_tokens == BUDGET

    outputs = drv.run()  # everything still finishes with the right tokens
    assert outputs == {"low": expected_chain(list(range(100, 138)), 3),
                       "urgent": expected_chain([1, 2, 3, 4], 5),
                       "long": expected_chain(list(range(200, 240)), 3)}
