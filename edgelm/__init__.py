"""edgelm: fast small language models on the devices people own."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so `import edgelm.layers...` does not pull in the loader's dependencies.
    if name == "load":
        from edgelm.loader import load

        return load
    raise AttributeError(name)


__all__ = ["load"]
