"""One exception type for every problem a user can fix: the CLI prints its message as one line."""


class BerthError(Exception):
    """A user-facing error. The message names the file, field or value and says what is wrong."""
