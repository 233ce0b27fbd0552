"""Curation with a trained model: scores, filtered datasets, embedding dedup."""
