"""The exception types printed as one line, never as a traceback: a user's mistake, or a failure of the environment."""


class UserError(Exception):
    """Bad input from the user (config, data, paths); the message names the file, line or key."""


class EnvironmentFailure(Exception):
    """Not a bug of ours and not bad input: the machine failed (disk full, store not writable, out of memory, a
    worker killed, a server that will not start). The message says what happened and what to do."""
