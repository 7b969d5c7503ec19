"""User errors: each message names the key or file at fault and how to fix it. The CLI prints them as one
line (no traceback unless --debug); anything else is a bug and keeps its traceback."""


class UserError(ValueError):
    """Base of every error a user can fix by changing the command, the config or the files."""


class UsageError(UserError):
    """A command-line or config mistake."""


class ConfigError(UserError):
    """A setting that cannot work."""


class DataError(UserError):
    """A data set or partition that cannot be built as asked."""


class RunError(UserError):
    """A run directory or checkpoint that cannot be used as asked."""


class TrainingDiverged(UserError):
    """A client's loss became NaN or infinite."""


class MethodError(ConfigError):
    """A method that breaks the method contract (``fedcoe_bench.method``): the message names the rule and the fix."""


class Interrupted(Exception):
    """A run stopped by SIGINT (Ctrl-C) or SIGTERM; the message says what was kept. Not a mistake: the CLI
    prints it as one line and exits with ``code``, the shell's code for the signal (130, 143)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code
