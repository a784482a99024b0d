"""Many checkpoints at once: one task per file on local processes or a Ray cluster (executors), the
per-file work as picklable functions (tasks), and the JSONL record a re-run resumes from (journal)."""
