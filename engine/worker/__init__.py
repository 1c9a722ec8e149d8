"""The paged engine's device side: turning a StepPlan into device inputs and launches, and reading a step's sampled
ids back (model_runner), with the KV pool and its size (kv_cache), the finitely many shapes a step runs at
(shape_buckets), the packed uploads and read-backs (staging) and the varlen batch layout (varlen)."""
