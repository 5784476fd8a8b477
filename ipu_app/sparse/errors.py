"""The DynSparse core's errors: one base for the user-facing ones (a one-line message each)."""


class UpdaterError(RuntimeError):
    """The updater cannot run with this model, optimizer, gradient or state."""


class PatternInvariantError(AssertionError):
    """A pattern update broke an invariant (a bug, never a user error)."""
