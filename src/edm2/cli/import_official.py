"""Placeholder, replaced by the module that implements `import_official`."""


def register(sub):
    pass
