"""Errors a user can fix. The CLI prints them as one line and exits with code 1."""


class UserError(Exception):
    """A problem with the user's input, with the fix in the message."""
