"""The one exception type for bad user input (files, folders, flags).

``InputError`` marks an error the user can fix from its message alone: the
message names the file or flag and the problem. The command line prints it as
one line and exits non-zero; every other exception is a bug and keeps its
traceback. It subclasses ``ValueError`` so callers that catch ``ValueError``
(and tests written against it) keep working.
"""


class InputError(ValueError):
  """Bad input named in the message: a file, a folder, a flag or a config field."""
