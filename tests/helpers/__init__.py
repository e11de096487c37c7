"""Helpers the tests share (not fixtures: those are in conftest.py): the registry lab, server processes."""
