"""Every error the daemon raises, in one module so nothing imports in circles.

Errors that reach a socket client carry a stable ``code`` (the protocol's error
codes map one-to-one to the subclasses of :class:`RequestError`).
"""

from __future__ import annotations

from typing import Any


class ObsdError(Exception):
    """Base of every ccos-obsd error."""


class ConfigError(ObsdError):
    """A configuration value is missing, of the wrong type or unusable."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config {key}: {problem}")
        self.key = key
        self.problem = problem


class StartupError(ObsdError):
    """The daemon cannot start: state dir locked, unsafe key permissions, ..."""


class BackupError(ObsdError):
    """A backup cannot be made: the destination is unusable or there is nothing to copy."""

    def __init__(self, message: str, field: str = "dest") -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class RequestError(ObsdError):
    """An error answered to a socket client as ``{"ok": false, "error": {...}}``."""

    code = "internal"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_wire(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return error


class BadJson(RequestError):
    code = "bad_json"


class FrameTooLarge(RequestError):
    code = "frame_too_large"


class UnknownOp(RequestError):
    code = "unknown_op"


class InvalidRequest(RequestError):
    """The request's own fields (not the action's) are wrong."""

    code = "invalid_request"


class InvalidAction(RequestError):
    code = "invalid_action"


class Conflict(RequestError):
    """Same action_id as a ledger entry, different content."""

    code = "conflict"


class NotFound(RequestError):
    code = "not_found"


class Forbidden(RequestError):
    """The peer is not in the socket's allow-lists, or the op is switched off by configuration."""

    code = "forbidden"


class Busy(RequestError):
    """A limit is reached (connections, pending appends); retry later."""

    code = "busy"


class Unavailable(RequestError):
    """The ledger cannot accept writes now (disk full, I/O error, shutting down)."""

    code = "unavailable"


class Internal(RequestError):
    code = "internal"


class VerificationError(ObsdError):
    """The ledger or an export is not intact; ``seq`` names the first bad entry."""

    def __init__(self, seq: int, kind: str, detail: str) -> None:
        super().__init__(f"seq {seq}: {kind}: {detail}")
        self.seq = seq
        self.kind = kind
        self.detail = detail


class RemoteError(ObsdError):
    """A client-side view of an error answer from the daemon."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{code}: {message}" + (f" (field {field})" if field else ""))
        self.code = code
        self.message = message
        self.field = field

    @classmethod
    def from_answer(cls, answer: dict[str, Any]) -> RemoteError:
        error = answer.get("error") or {}
        return cls(str(error.get("code", "internal")), str(error.get("message", "")), error.get("field"))
