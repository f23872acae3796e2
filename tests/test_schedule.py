"""The loop's schedule, without compiling anything: when it evaluates, how far each call runs.

The reference is nanoGPT's train.py loop (and the lecture's gpt.py loop) written out step by
step: evaluate at the top of an iteration, stop at max_iters, else take one step.
"""

import itertools

import pytest

from configs import shakespeare_cpu_muon
from jaxgpt.training import Evaluate, Schedule, Steps


def reference_evals(start, max_iters, eval_interval, lecture=False, evaluated=None,
                    at_start=True):
    """The steps a step-by-step loop evaluates at, from `start` (a resumed run's step);
    at_start=False: the same loop with `and iter > 0` on its regular evals."""
    evals = []
    for it in range(start, max_iters + 1):
        if lecture:  # gpt.py: `if iter % eval_interval == 0 or iter == max_iters - 1`
            due = ((it % eval_interval == 0 and (it > 0 or at_start)) or it == max_iters - 1) \
                and it < max_iters
        else:  # nanoGPT: `if iter_num % eval_interval == 0`, and its last iteration
            due = (it % eval_interval == 0 and (it > 0 or at_start)) or it == max_iters
        if due and it != evaluated:
            evals.append(it)
    return evals


def run(schedule, start):
    """(eval steps, calls as (first step, n)) of the events from `start`."""
    events = list(schedule.events(start))
    assert all(isinstance(e, Evaluate | Steps) for e in events)
    return ([e.step for e in events if isinstance(e, Evaluate)],
            [(e.step, e.n) for e in events if isinstance(e, Steps)])


CASES = list(itertools.product([1, 7, 10, 12], [1, 3, 4, 5], [1, 2, 3, 8], [False, True],
                               [True, False]))


@pytest.mark.parametrize("max_iters, eval_interval, steps_per_call, lecture, at_start", CASES)
def test_events_match_the_step_by_step_loop(max_iters, eval_interval, steps_per_call, lecture,
                                            at_start):
    schedule = Schedule(max_iters, eval_interval, steps_per_call, lecture,
                        eval_at_start=at_start)
    evals, calls = run(schedule, 0)
    assert evals == reference_evals(0, max_iters, eval_interval, lecture, at_start=at_start)
    # the calls tile 0..max_iters in order, each at most steps_per_call long
    assert [s for s, _ in calls] == list(itertools.accumulate([0] + [n for _, n in calls]))[:-1]
    assert sum(n for _, n in calls) == max_iters
    assert all(1 <= n <= steps_per_call for _, n in calls)
    # no call runs across an eval: every eval step is the start or the end of a call
    bounds = {s for s, _ in calls} | {s + n for s, n in calls}
    assert set(evals) <= bounds


def test_nanogpts_last_eval_is_after_the_last_step():
    evals, calls = run(Schedule(10, 4), 0)
    assert evals == [0, 4, 8, 10] and calls[-1] == (9, 1)
    assert not Schedule(10, 4).saves_last_step(10)  # its last eval saved the final state


def test_eval_at_start_false_skips_only_the_first_eval():
    """The Muon recipe's setting, read from a config: one eval, after the last step."""
    c = shakespeare_cpu_muon.get_config()
    evals, calls = run(Schedule.from_config(c), 0)
    assert not c.eval_at_start and evals == [c.max_iters]
    assert calls == [(s, c.steps_per_call) for s in range(0, c.max_iters, c.steps_per_call)]
    c.eval_interval = c.max_iters // 2  # the regular evals after step 0 stay
    assert run(Schedule.from_config(c), 0)[0] == [c.max_iters // 2, c.max_iters]


def test_the_lectures_last_eval_is_before_the_last_step():
    schedule = Schedule(10, 4, steps_per_call=8, eval_before_last_step=True)
    evals, calls = run(schedule, 0)
    assert evals == [0, 4, 8, 9]
    assert calls == [(0, 4), (4, 4), (8, 1), (9, 1)]  # the step after the last eval still runs
    assert schedule.saves_last_step(10)  # so the final state is saved without a val loss


def test_steps_per_call_not_dividing_eval_interval():
    evals, calls = run(Schedule(10, 5, steps_per_call=3), 0)
    assert evals == [0, 5, 10]
    assert calls == [(0, 3), (3, 2), (5, 3), (8, 2)]


@pytest.mark.parametrize("start", [4, 5, 8, 10])
def test_a_resumed_step_already_evaluated_is_not_evaluated_again(start):
    schedule = Schedule(10, 4, steps_per_call=2, evaluated=start)
    evals, calls = run(schedule, start)
    assert evals == reference_evals(start, 10, 4, evaluated=start)
    assert start not in evals
    assert sum(n for _, n in calls) == 10 - start


def test_a_step_saved_in_the_middle_of_its_eval_is_evaluated_on_resume():
    """A preemption during the eval at step 8 saved step 8 without a val loss: evaluated=None."""
    evals, calls = run(Schedule(10, 4, steps_per_call=2, evaluated=None), 8)
    assert evals == [8, 10] and calls == [(8, 2)]


def test_a_run_resumed_at_or_past_max_iters_trains_no_step():
    assert run(Schedule(10, 4, evaluated=10), 10) == ([], [])
    assert run(Schedule(10, 4), 10) == ([10], [])  # saved mid-eval at the end: evaluate only
    assert run(Schedule(10, 4), 12) == ([], [])  # max_iters lowered below the checkpoint
    assert run(Schedule(10, 4, eval_before_last_step=True), 10) == ([], [])
    assert Schedule(10, 4, eval_before_last_step=True).saves_last_step(12)


def test_from_config_reads_the_loop_keys(tiny_config):
    c = tiny_config
    c.max_iters, c.eval_interval, c.steps_per_call, c.eval_before_last_step = 9, 3, 2, True
    assert Schedule.from_config(c, evaluated=3) == Schedule(9, 3, 2, True, 3)
