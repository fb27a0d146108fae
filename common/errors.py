"""Errors that carry a message meant for a person (CLI prints it on one line, the service maps it to HTTP)."""


class VideoGPAError(Exception):
    """Base class: `str(err)` is a complete, user-facing sentence."""

    #: HTTP status that the service answers with for this error.
    http_status: int = 400


class InputNotFoundError(VideoGPAError):
    http_status = 404


class NotAVideoError(VideoGPAError):
    """The input is not a video or an image folder we can read (unknown container, no video stream)."""

    http_status = 415


class CorruptVideoError(VideoGPAError):
    """The container opened but decoding failed (truncated or damaged file)."""

    http_status = 422


class TooFewFramesError(VideoGPAError):
    http_status = 422


class InputTooLargeError(VideoGPAError):
    """Resolution, frame count or file size over the configured limits."""

    http_status = 413


class DeadlineExceededError(VideoGPAError):
    """The request's deadline passed (or its caller gave up) before the work finished."""

    http_status = 504


class ConfigError(VideoGPAError):
    """A setting is invalid or names something that is not available (unknown backend, missing weights)."""

    http_status = 422


def invalid_settings(err, what: str = "setting") -> ConfigError:
    """A pydantic ValidationError as a one-line ConfigError naming the first bad field."""
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "settings"
    return ConfigError(f"invalid {what} {field}: {first['msg']}")
