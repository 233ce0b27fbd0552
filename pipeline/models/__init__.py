"""Towers (open_clip modules) and the heads that live beside them."""
