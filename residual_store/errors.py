"""Domain exceptions of the residual contract; the server translates them to HTTP at its edge."""


class ResidualStoreError(Exception):
    """Base class of every error this package raises on purpose."""


class ResidualFormatError(ResidualStoreError, ValueError):
    """A residual file that is not a valid uda-residual/1 file (the message names the problem)."""


class ResidualMismatch(ResidualStoreError, ValueError):
    """A valid residual that belongs to another base model (fingerprint or layout differ)."""


class InvalidTaskName(ResidualStoreError, ValueError):
    """A task name outside ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$."""


class UnknownTask(ResidualStoreError, KeyError):
    """No such task (or no such version of it) in the store."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown task"


class StoreUnavailable(ResidualStoreError, ConnectionError):
    """The store cannot be reached (Redis down, directory not mounted...)."""


class IntegrityError(ResidualStoreError):
    """A stored blob whose sha256 no longer matches what was published."""


class BaseModelError(ResidualStoreError, ValueError):
    """The base model cannot be built (unknown name, missing checkpoint, no network...)."""
