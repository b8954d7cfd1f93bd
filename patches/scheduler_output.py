"""What the connector's scheduler side reads of vLLM's `SchedulerOutput` each step.

The fields (`num_scheduled_tokens`: request id -> tokens, `total_num_scheduled_tokens`,
`finished_req_ids`, `scheduled_new_reqs`: the requests in their first forward) exist in
vLLM 0.26 and 0.32. Read here, and strictly: a vLLM that
renamed one must fail at the first step, not read as an idle engine, in which every load
would be judged lone and run synchronously inside the step.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepView:
    scheduled: frozenset[str]  # requests with tokens in this step's forward
    finished: frozenset[str]  # requests finished since the previous step
    total_tokens: int  # tokens of this step's forward, all requests
    starting: int  # requests in their first forward (a short prompt's first token)


def step_view(scheduler_output) -> StepView:
    try:
        return StepView(frozenset(scheduler_output.num_scheduled_tokens),
                        frozenset(scheduler_output.finished_req_ids),
                        int(scheduler_output.total_num_scheduled_tokens),
                        len(scheduler_output.scheduled_new_reqs))
    except AttributeError as e:
        raise RuntimeError(f"kvflow: this vLLM's SchedulerOutput lacks a field the connector "
                           f"reads ({e}); see patches/scheduler_output.py") from e
