"""The one exception type the CLI turns into a single clear line and a non-zero exit."""


class UserError(Exception):
    """Bad input or an unreachable dependency: printed as one line, exit status 2."""
