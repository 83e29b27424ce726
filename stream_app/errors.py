"""Errors a user can cause. The CLI prints them as one line naming the fix, no traceback."""


class UserError(Exception):
    """Message must say what is wrong and how to fix it, in one line."""
