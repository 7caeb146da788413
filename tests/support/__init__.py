"""Helpers the tests share, reached through tests/conftest.py's fixtures, never imported by a test file.

`frames` builds synthetic sweep results (and stores them as the sweep runner does); `fakes` holds the
stand-in training functions, kept in a module of their own because sweep worker processes import them
by their dotted name (`support.fakes`) when they unpickle a job; `host_syncs` counts the host
synchronisations a GPU would make, on CPU tensors.
"""
