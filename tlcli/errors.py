"""The one error family. The library raises these; only ``tlcli.cli`` prints them."""


class TlcliError(Exception):
    """A user-facing problem: the message names the file or option and the fix."""

    exit_code = 1


class UsageError(TlcliError):
    """An option value that cannot work."""

    exit_code = 2


class DatasetError(TlcliError):
    """The image folder cannot be used for training or evaluation. ``skipped``: the unusable files
    behind it, if any (``{path, reason, detail}`` each), for the caller to list."""

    def __init__(self, message: str, *, skipped: list[dict] | None = None):
        super().__init__(message)
        self.skipped = skipped or []


class ImageError(TlcliError):
    """One image file cannot be decoded. ``reason`` is a short machine-friendly word."""

    def __init__(self, path, reason, detail=""):
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


class BackboneError(TlcliError):
    """The backbone cannot be fetched, loaded, or is not an image feature vector."""


class BundleError(TlcliError):
    """The model bundle is missing, incomplete, corrupt or from a newer tlcli."""


class OutputExistsError(TlcliError):
    """Refusing to replace an existing model without ``--force``."""


class Interrupted(TlcliError):
    """Training was interrupted (Ctrl-C); the previous bundle is intact."""

    exit_code = 130
