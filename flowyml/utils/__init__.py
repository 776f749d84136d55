"""Helpers for use inside steps."""
