"""The paged engine's host side: the step loop (paged_engine: submit, step, abort, generate, stream, score), which
sequences run next and with which KV blocks (scheduler, block_manager, slots), the plan of one step (step_plan), and
one request as a running sequence (sequence). Nothing here touches a tensor: the scheduler hands the worker a
StepPlan."""
