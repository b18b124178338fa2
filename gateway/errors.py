"""Exception hierarchy and the RFC 6120 error conditions (STYLE E1-E3).

Pure code raises these; the I/O shell translates them: `RemoteProtocolError` becomes a
`<stream:error/>` and a close, `StanzaError` an error reply while the stream goes on,
`AuthFailure` a SASL `<failure/>`.
"""

from __future__ import annotations

import enum


class StreamErrorCondition(enum.Enum):
    """RFC 6120 section 4.9.3 stream error conditions; values are the wire names."""

    BAD_FORMAT = "bad-format"
    BAD_NAMESPACE_PREFIX = "bad-namespace-prefix"
    CONFLICT = "conflict"
    CONNECTION_TIMEOUT = "connection-timeout"
    HOST_GONE = "host-gone"
    HOST_UNKNOWN = "host-unknown"
    IMPROPER_ADDRESSING = "improper-addressing"
    INTERNAL_SERVER_ERROR = "internal-server-error"
    INVALID_FROM = "invalid-from"
    INVALID_NAMESPACE = "invalid-namespace"
    INVALID_XML = "invalid-xml"
    NOT_AUTHORIZED = "not-authorized"
    NOT_WELL_FORMED = "not-well-formed"
    POLICY_VIOLATION = "policy-violation"
    REMOTE_CONNECTION_FAILED = "remote-connection-failed"
    RESET = "reset"
    RESOURCE_CONSTRAINT = "resource-constraint"
    RESTRICTED_XML = "restricted-xml"
    SEE_OTHER_HOST = "see-other-host"
    SYSTEM_SHUTDOWN = "system-shutdown"
    UNDEFINED_CONDITION = "undefined-condition"
    UNSUPPORTED_ENCODING = "unsupported-encoding"
    UNSUPPORTED_FEATURE = "unsupported-feature"
    UNSUPPORTED_STANZA_TYPE = "unsupported-stanza-type"
    UNSUPPORTED_VERSION = "unsupported-version"


class StanzaErrorCondition(enum.Enum):
    """RFC 6120 section 8.3.3 stanza error conditions; values are the wire names."""

    BAD_REQUEST = "bad-request"
    CONFLICT = "conflict"
    FEATURE_NOT_IMPLEMENTED = "feature-not-implemented"
    FORBIDDEN = "forbidden"
    GONE = "gone"
    INTERNAL_SERVER_ERROR = "internal-server-error"
    ITEM_NOT_FOUND = "item-not-found"
    JID_MALFORMED = "jid-malformed"
    NOT_ACCEPTABLE = "not-acceptable"
    NOT_ALLOWED = "not-allowed"
    NOT_AUTHORIZED = "not-authorized"
    POLICY_VIOLATION = "policy-violation"
    RECIPIENT_UNAVAILABLE = "recipient-unavailable"
    REDIRECT = "redirect"
    REGISTRATION_REQUIRED = "registration-required"
    REMOTE_SERVER_NOT_FOUND = "remote-server-not-found"
    REMOTE_SERVER_TIMEOUT = "remote-server-timeout"
    RESOURCE_CONSTRAINT = "resource-constraint"
    SERVICE_UNAVAILABLE = "service-unavailable"
    SUBSCRIPTION_REQUIRED = "subscription-required"
    UNDEFINED_CONDITION = "undefined-condition"
    UNEXPECTED_REQUEST = "unexpected-request"


class ErrorType(enum.Enum):
    """RFC 6120 section 8.3.2 stanza error types."""

    AUTH = "auth"
    CANCEL = "cancel"
    CONTINUE = "continue"
    MODIFY = "modify"
    WAIT = "wait"


class SaslCondition(enum.Enum):
    """RFC 6120 section 6.5 SASL failure conditions."""

    ABORTED = "aborted"
    ACCOUNT_DISABLED = "account-disabled"
    CREDENTIALS_EXPIRED = "credentials-expired"
    ENCRYPTION_REQUIRED = "encryption-required"
    INCORRECT_ENCODING = "incorrect-encoding"
    INVALID_AUTHZID = "invalid-authzid"
    INVALID_MECHANISM = "invalid-mechanism"
    MALFORMED_REQUEST = "malformed-request"
    MECHANISM_TOO_WEAK = "mechanism-too-weak"
    NOT_AUTHORIZED = "not-authorized"
    TEMPORARY_AUTH_FAILURE = "temporary-auth-failure"


# Default error type per condition (RFC 6120 section 8.3.3 examples).
DEFAULT_ERROR_TYPE: dict[StanzaErrorCondition, ErrorType] = {
    StanzaErrorCondition.BAD_REQUEST: ErrorType.MODIFY,
    StanzaErrorCondition.CONFLICT: ErrorType.CANCEL,
    StanzaErrorCondition.FEATURE_NOT_IMPLEMENTED: ErrorType.CANCEL,
    StanzaErrorCondition.FORBIDDEN: ErrorType.AUTH,
    StanzaErrorCondition.GONE: ErrorType.CANCEL,
    StanzaErrorCondition.INTERNAL_SERVER_ERROR: ErrorType.CANCEL,
    StanzaErrorCondition.ITEM_NOT_FOUND: ErrorType.CANCEL,
    StanzaErrorCondition.JID_MALFORMED: ErrorType.MODIFY,
    StanzaErrorCondition.NOT_ACCEPTABLE: ErrorType.MODIFY,
    StanzaErrorCondition.NOT_ALLOWED: ErrorType.CANCEL,
    StanzaErrorCondition.NOT_AUTHORIZED: ErrorType.AUTH,
    StanzaErrorCondition.POLICY_VIOLATION: ErrorType.MODIFY,
    StanzaErrorCondition.RECIPIENT_UNAVAILABLE: ErrorType.WAIT,
    StanzaErrorCondition.REDIRECT: ErrorType.MODIFY,
    StanzaErrorCondition.REGISTRATION_REQUIRED: ErrorType.AUTH,
    StanzaErrorCondition.REMOTE_SERVER_NOT_FOUND: ErrorType.CANCEL,
    StanzaErrorCondition.REMOTE_SERVER_TIMEOUT: ErrorType.WAIT,
    StanzaErrorCondition.RESOURCE_CONSTRAINT: ErrorType.WAIT,
    StanzaErrorCondition.SERVICE_UNAVAILABLE: ErrorType.CANCEL,
    StanzaErrorCondition.SUBSCRIPTION_REQUIRED: ErrorType.AUTH,
    StanzaErrorCondition.UNDEFINED_CONDITION: ErrorType.CANCEL,
    StanzaErrorCondition.UNEXPECTED_REQUEST: ErrorType.WAIT,
}


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ProtocolError(GatewayError):
    """A protocol rule was broken."""


class LocalProtocolError(ProtocolError):
    """Our own misuse of a state machine: a bug, never the peer's fault."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the stream: answered with a stream error and a close."""

    def __init__(
        self, condition: StreamErrorCondition, text: str | None = None, extra: object = None
    ) -> None:
        super().__init__(f"{condition.value}: {text}" if text else condition.value)
        self.condition = condition
        self.text = text
        # An application-specific condition element (e.g. XEP-0198's
        # <handled-count-too-high/>), added to the <stream:error/> as is.
        self.extra = extra


class StanzaError(GatewayError):
    """A well-formed but unacceptable stanza: answered with an error reply."""

    def __init__(
        self,
        condition: StanzaErrorCondition,
        error_type: ErrorType | None = None,
        text: str | None = None,
    ) -> None:
        super().__init__(f"{condition.value}: {text}" if text else condition.value)
        self.condition = condition
        self.error_type = error_type or DEFAULT_ERROR_TYPE[condition]
        self.text = text


class AuthFailure(GatewayError):
    """A SASL exchange failed; answered with `<failure/>` carrying the condition."""

    def __init__(self, condition: SaslCondition, text: str | None = None) -> None:
        super().__init__(f"{condition.value}: {text}" if text else condition.value)
        self.condition = condition
        self.text = text


class JIDError(GatewayError):
    """A string is not a valid JID (RFC 7622); answered with `jid-malformed`."""


class ConfigError(GatewayError):
    """A configuration value is refused; the message names the file and the dotted key."""

    def __init__(self, path: str, key: str, message: str) -> None:
        super().__init__(f"{path}: {key}: {message}" if key else f"{path}: {message}")
        self.path = path
        self.key = key
        self.message = message


class StorageError(GatewayError):
    """A storage backend failed."""
