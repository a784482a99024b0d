"""Many checkpoints at once: one task per file on local processes or a Ray cluster (executors), the
per-file work as picklable functions (tasks), the JSONL record a re-run resumes from (journal), and
the whole as a function (commands: :func:`run_fleet`, what the CLI's fleet options do)."""

from ckptmigrate.fleet.commands import fleet_results, run_fleet

__all__ = ["fleet_results", "run_fleet"]
