"""The one exception type users see: every message names the problem and what to do about it."""


class FlashMoeError(Exception):
    """Bad input or a broken store: the message is meant for the user, not a traceback."""
