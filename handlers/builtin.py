"""Imports every built-in handler module so that each registers itself."""
