"""A recording stand-in for the ``poptorch`` / ``popdist`` surface: every call is logged as
``(dotted path, args, kwargs)`` and returns another recorder, so option-builder chains and
executor calls can be checked without the Poplar SDK."""


class Recorder:
    def __init__(self, log, path, returns=None):
        self._log = log
        self._path = path
        self._returns = returns or {}

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Recorder(self._log, f"{self._path}.{name}", self._returns)

    def __call__(self, *args, **kwargs):
        self._log.append((self._path, args, kwargs))
        if self._path in self._returns:
            value = self._returns[self._path]
            return value(*args, **kwargs) if callable(value) else value
        return Recorder(self._log, f"{self._path}()", self._returns)

    def __repr__(self):
        return f"<{self._path}>"


def calls(log, path):
    """The (args, kwargs) of every call to ``path``."""
    return [(a, k) for p, a, k in log if p == path]
