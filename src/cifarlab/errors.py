"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class CifarlabError(Exception):
    """A problem with the user's input (config, data, checkpoint) that they can fix.

    The CLI prints ``cifarlab: error: <message>`` and exits with status 2; no traceback.
    Raise it with a message that names the offending thing and the fix.
    """
