"""The exception types printed as one line, never as a traceback: a user's mistake, or a failure of the environment."""


class UserError(Exception):
    """Bad input from the user (config, data, paths); the message names the file, line or key."""


class EnvironmentFailure(Exception):
    """Not a bug of ours and not bad input: the machine failed (disk full, store not writable, out of memory, a
    worker killed, a server that will not start). The message says what happened and what to do."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (library errors can span many), at most 200 characters."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]
