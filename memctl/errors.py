"""The exception types for problems a user can fix (bad recipe, missing run, full disk, ...).

The CLI prints a UserError as one line on stderr and exits with code 2; nothing else
catches it.
"""


class UserError(Exception):
    """A problem with the user's input, stated in one line that names the field or file."""


class StorageError(UserError):
    """A run's file could not be written: a full disk, a read-only or vanished folder.

    A UserError (exit code 2, one line): the fix is the user's (free space, make the folder
    writable) and the run is resumable as it stands, because every file is written
    atomically or appended and cut back on resume. Exit code 1 stays for a training that
    failed on its own (a non-finite loss), so scripts can tell the two apart.
    """
