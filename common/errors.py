"""Errors that carry a message meant for a person (CLI prints it on one line, the service maps it to HTTP)."""

from typing import Optional

from pydantic import BaseModel, Field


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


# The one error envelope: what every engine answers with and the ingress sends over HTTP.
class ErrorInfo(BaseModel):
    """One failed request, as every engine answers it and as HTTP carries it (`{"error": {...}}`)."""

    status: int = Field(description="The HTTP status the service answers with.")
    type: str = Field(description="Error class, e.g. NotAVideoError, InputTooLargeError, Overloaded.")
    message: str = Field(description="A complete sentence for a person (never a server path or an exception's text).")

    @classmethod
    def of(cls, err: VideoGPAError, message: Optional[str] = None) -> "ErrorInfo":
        """The envelope of a user-facing error (`message` replaces its sentence, e.g. without server paths)."""
        return cls(status=err.http_status, type=type(err).__name__, message=str(err) if message is None else message)

    def envelope(self) -> dict:
        """`{"error": {"status", "type", "message"}}`: the JSON shape of every error answer."""
        return {"error": self.model_dump()}


class Answer(BaseModel):
    """Base of an engine's answer: its `result` (declared by each engine), or the error envelope. Exactly one is set."""

    error: Optional[ErrorInfo] = None

    @classmethod
    def failed(cls, status: int, kind: str, message: str):
        return cls(error=ErrorInfo(status=status, type=kind, message=message))
