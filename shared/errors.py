"""Errors with messages a user can act on. Each is a ValueError/LookupError so callers can map them to 4xx."""


class DfkdError(Exception):
    """Base class for the project's user-facing errors."""


class UnknownModelError(DfkdError, LookupError):
    """A model name that is neither registered by the project nor known to timm."""


class WeightsError(DfkdError, ValueError):
    """A weights file that is missing, unreadable, or does not fit the architecture."""


class InvalidRequestError(DfkdError, ValueError):
    """A synthesis request with bad arguments (class ids, counts, iterations)."""


class WireFormatError(DfkdError, ValueError):
    """A stream entry that does not decode: unknown version, bad header, missing chunk, wrong size or checksum."""
