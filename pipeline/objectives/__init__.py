"""Objective units: one module per objective (see base.py for what a unit owns, registry.py for the list)."""
