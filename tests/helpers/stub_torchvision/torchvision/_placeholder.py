"""Placeholder names: importable (and subclassable), refused when used."""


def placeholder(module: str, name: str) -> type:
    if name.startswith("__"):
        raise AttributeError(name)

    def refuse(self, *args, **kwargs):
        raise NotImplementedError(f"{module}.{name} is not available in the stub torchvision (tests only)")

    return type(name, (), {"__init__": refuse, "__module__": module})
