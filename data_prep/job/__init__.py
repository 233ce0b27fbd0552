"""Running a sharding job: the plan, the worker pool, one work unit, local runs and job-array tasks."""
