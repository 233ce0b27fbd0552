"""Moved to tests/helpers/fmnist_fixture.py. This re-export stays only while tests/test_model_card.py (changed
elsewhere) still imports `tests.fmnist_fixture`; delete it once that file imports `tests.helpers.fmnist_fixture`."""
from tests.helpers.fmnist_fixture import TEST_MODEL_CFG  # noqa: F401
