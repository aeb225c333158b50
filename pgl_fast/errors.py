"""The engine's one exception for input a user can fix (a flag, a file, a model that cannot be cut).

Its message is a single line naming the flag, file or part at fault and what is allowed; the CLIs
print it as ``error: <message>`` and exit with status 2, never with a traceback."""


class UserError(Exception):
    """Bad input the user can fix; the message is one line."""
