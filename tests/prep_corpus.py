"""Moved to tests/helpers/prep_corpus.py. This re-export stays only while tests/test_model_card.py (changed
elsewhere) still imports `tests.prep_corpus`; delete it once that file imports `tests.helpers.prep_corpus`."""
from tests.helpers.prep_corpus import real_photos  # noqa: F401
