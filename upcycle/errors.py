"""The one error type a user sees: a clear sentence, printed by the CLI without a traceback."""


class UpcycleError(Exception):
    """A problem with the user's input or environment, explained in one sentence."""
