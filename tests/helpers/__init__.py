"""What several test files share: corpora, fixtures, servers, the SLURM cluster and the float tolerances.

Test files import these as `tests.helpers.<module>` (the repo root is on sys.path through pyproject's
`pythonpath`); no test file imports another test file.
"""
