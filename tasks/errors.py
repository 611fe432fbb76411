"""The one exception type for a user's mistake: printed as one line, never as a traceback."""


class UserError(Exception):
    """Bad input from the user (config, data, paths); the message names the file, line or key."""
