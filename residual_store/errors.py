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


def one_line(error: BaseException, limit: int | None = None) -> str:
    """An error as one line for a terminal or a wrapping message (load_state_dict lists every
    missing key on its own line; an OSError reads best as `path: reason`)."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    else:
        text = " ".join(str(error).split()) or type(error).__name__
    return text if limit is None or len(text) <= limit else text[:limit] + "..."
