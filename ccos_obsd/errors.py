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


class SystemdEnvironmentError(ObsdError, ValueError):
    """$LISTEN_FDS and friends are present but malformed."""


class UsageError(ObsdError):
    """A command line's arguments are wrong or missing (``ccos-obsd`` exits 2)."""


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

    @classmethod
    def check_string(cls, value: Any, field: str) -> str:
        """``value`` if it is a string SQLite can bind (UTF-8 encodable), else this error naming ``field``."""
        if not isinstance(value, str):
            raise cls(f"{field} must be a string", field=field)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise cls(f"{field} is not valid Unicode (lone surrogate)", field=field) from None
        return value


class WmQueryError(InvalidRequest):
    """A Working Memory search argument is unusable (``field`` names it)."""


class InvalidAction(RequestError):
    code = "invalid_action"


class Conflict(RequestError):
    """Same action_id as a ledger entry, different content."""

    code = "conflict"


class NotFound(RequestError):
    code = "not_found"


class Forbidden(RequestError):
    """The peer does not hold the op's role on the socket, or the op is switched off by configuration."""

    code = "forbidden"


class Busy(RequestError):
    """A limit is reached (connections, pending appends); retry later."""

    code = "busy"


class Unavailable(RequestError):
    """The ledger cannot accept writes now (disk full, I/O error, shutting down)."""

    code = "unavailable"


class Internal(RequestError):
    code = "internal"


class NotCanonicalizable(ObsdError, ValueError):
    """The value holds something canonical JSON cannot express."""


class KeyFormatError(ObsdError, ValueError):
    """A verifier or signer key string is malformed."""


class ProofError(ObsdError):
    """An inclusion or consistency proof does not verify, or its arguments cannot."""


class NoteError(ObsdError):
    """A signed note, checkpoint or tlog proof is malformed or does not verify."""


class MalformedNoteError(NoteError):
    """The text does not follow the format (note, checkpoint or tlog proof)."""


class NoteSignatureError(NoteError):
    """A signature by a known key does not verify: the note was altered or forged."""


class UntrustedNoteError(NoteError):
    """No known key signed the note (or, for a checkpoint, not the log's key)."""


class VerificationError(ObsdError):
    """The ledger or an export is not intact; ``seq`` names the first bad entry."""

    def __init__(self, seq: int, kind: str, detail: str) -> None:
        super().__init__(f"seq {seq}: {kind}: {detail}")
        self.seq = seq
        self.kind = kind
        self.detail = detail


class WmDerivationError(ObsdError):
    """A stored entry is not a JSON object with an action_id and an action_type."""

    def __init__(self, seq: int, problem: str) -> None:
        super().__init__(f"seq {seq}: cannot derive a Working Memory entry: {problem}")
        self.seq = seq
        self.problem = problem

    def __reduce__(self) -> tuple[type[WmDerivationError], tuple[int, str]]:
        return WmDerivationError, (self.seq, self.problem)  # crosses from replay's worker processes


class WmReadOnlyError(ObsdError):
    """A write was attempted on a Working Memory store opened with ``WmStore.open_readonly``."""


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
