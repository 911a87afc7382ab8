"""The one exception type for mistakes a user can fix (bad recipe, missing run, ...).

The CLI prints it as one line on stderr and exits with code 2; nothing else catches it.
"""


class UserError(Exception):
    """A problem with the user's input, stated in one line that names the field or file."""
