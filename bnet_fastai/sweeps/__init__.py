"""Many runs: a grid (`sweep`), where its runs train (`executors`: this process, worker processes, Ray tasks) and
the study profiles behind the notebook (`study`). Builds on `runs`."""
