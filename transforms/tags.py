"""The names the pipeline's steps share: output tags and the Beam metrics namespace.

One module, so that the step that emits a tagged output, the step that reads it and the progress line that polls
the metrics cannot spell a name two ways.
"""

# Every weakloc counter and distribution lives in this Beam metrics namespace.
NAMESPACE = "weakloc"
# Tagged outputs: failure rows (schema.FAILURE_SCHEMA), and image ids that an earlier output already labelled
# (--skip_labeled).
FAILURES = "failures"
SKIPPED = "skipped"
# Distribution of each batch's end, in milliseconds since the job was built: its min and max bound the steady
# loop on every runner that reports metrics, all workers together (pipeline/progress.steady_throughput).
BATCH_DONE = "batch_done_ms"
