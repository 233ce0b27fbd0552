"""Commands over a finished dataset: merge, repair, verify, index."""
