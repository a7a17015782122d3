"""Placeholder, replaced by the module that implements `generate`."""


def register(sub):
    pass
