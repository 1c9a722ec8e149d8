"""The paged engine's device side: turning a StepPlan into device inputs and launches, and reading a step's sampled
ids back (model_runner), with the packed uploads and read-backs (staging) and the varlen batch layout (varlen)."""
