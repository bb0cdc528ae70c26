"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class CifarlabError(Exception):
    """A problem with the user's input (config, data, checkpoint) that they can fix.

    The CLI prints ``cifarlab: error: <message>`` and exits with status 2; no traceback.
    Raise it with a message that names the offending thing and the fix.
    """


class TrainingStopped(CifarlabError):
    """Training itself failed and was stopped by a guard (diverged, stuck at chance).

    A separate exit status (3) lets scripts and sweeps tell "this configuration does not
    train" from "this command line is wrong" (2). The message carries the advice.
    """

    exit_code = 3


class TrainingInterrupted(CifarlabError):
    """A run stopped by SIGINT/SIGTERM after saving a checkpoint it can resume from.

    ``exit_code`` is 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM), as a
    shell reports a process killed by that signal; the message says how to resume.
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
