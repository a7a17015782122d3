"""Placeholder, replaced by the module that implements `phema`."""


def register(sub):
    pass
