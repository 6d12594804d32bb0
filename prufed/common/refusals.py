"""Every reason the aggregator refuses a call: one enum of codes, one table from code to gRPC status.

Both roles read it: the aggregator raises `Refused(code, message)` and maps the code to a status in one place;
the edge client's transport can read the code back from the `prufed-refusal` trailing metadata of a failed call.
Status names (not `grpc.StatusCode` members) keep this module free of gRPC.
"""

from __future__ import annotations

from enum import StrEnum

from prufed.common.errors import PrufedError

REFUSAL_METADATA_KEY = "prufed-refusal"
"""Trailing-metadata key under which a refused call carries its `RefusalCode` value."""


class RefusalCode(StrEnum):
    """One code per fault class; the value is what logs, metrics and trailing metadata carry."""

    # the request itself
    BAD_REQUEST = "bad_request"  # a malformed message or stream (a field out of range, a part out of order)
    UNAUTHENTICATED = "unauthenticated"  # missing or invalid bearer / enrolment token
    CERT_MISMATCH = "cert_mismatch"  # mTLS client certificate not the one bound to the client id
    UNKNOWN_CLIENT = "unknown_client"
    BASE_MODEL_MISMATCH = "base_model_mismatch"
    BAD_KEPT_LAYERS = "bad_kept_layers"  # kept_layers invalid, or not those registered / in the global
    BAD_PROFILE = "bad_profile"  # Register's profile_json / name too large, not a JSON object, or too deep
    RATE_LIMITED = "rate_limited"  # too many calls per enrolment token or peer
    TOO_MANY_CLIENTS = "too_many_clients"
    # upload stream and file
    TOO_LARGE = "too_large"  # declared total_bytes over --max-upload-mib
    OVERFLOW = "overflow"  # more bytes than declared
    TRUNCATED = "truncated"
    CHECKSUM = "checksum"
    TOO_MANY_STREAMS = "too_many_streams"  # this client already has its allowed concurrent uploads open
    SERVER_BUSY = "server_busy"  # the server-wide concurrent upload cap is reached: retry later
    STREAM_IDLE = "stream_idle"  # nothing received for the idle timeout
    STREAM_DEADLINE = "stream_deadline"  # the upload took longer than its overall deadline
    HEADER_TOO_LARGE = "header_too_large"  # safetensors JSON header above the cap derived from the tensor index
    BAD_FILE = "bad_file"  # not a readable safetensors adapter file
    BAD_FORMAT = "bad_format"  # readable, but not an update (e.g. a global adapter)
    INDEX_MISMATCH = "index_mismatch"
    META_MISMATCH = "meta_mismatch"
    BAD_NUM_EXAMPLES = "bad_num_examples"
    WRONG_KEYS = "wrong_keys"
    BAD_SHAPE = "bad_shape"
    BAD_DTYPE = "bad_dtype"
    NON_FINITE = "non_finite"
    # round and version state
    STALE_ROUND = "stale_round"
    NOT_SAMPLED = "not_sampled"
    UPLOAD_CONFLICT = "upload_conflict"
    NO_VERSION = "no_version"
    INTERNAL = "internal"  # a server bug: logged with its traceback, the client sees only this code


STATUS_NAME: dict[RefusalCode, str] = {
    RefusalCode.BAD_REQUEST: "INVALID_ARGUMENT",
    RefusalCode.UNAUTHENTICATED: "UNAUTHENTICATED",
    RefusalCode.CERT_MISMATCH: "PERMISSION_DENIED",
    RefusalCode.UNKNOWN_CLIENT: "UNAUTHENTICATED",
    RefusalCode.BASE_MODEL_MISMATCH: "INVALID_ARGUMENT",
    RefusalCode.BAD_KEPT_LAYERS: "INVALID_ARGUMENT",
    RefusalCode.BAD_PROFILE: "INVALID_ARGUMENT",
    RefusalCode.RATE_LIMITED: "RESOURCE_EXHAUSTED",
    RefusalCode.TOO_MANY_CLIENTS: "RESOURCE_EXHAUSTED",
    RefusalCode.TOO_LARGE: "RESOURCE_EXHAUSTED",
    RefusalCode.OVERFLOW: "INVALID_ARGUMENT",
    RefusalCode.TRUNCATED: "INVALID_ARGUMENT",
    RefusalCode.CHECKSUM: "DATA_LOSS",
    RefusalCode.TOO_MANY_STREAMS: "RESOURCE_EXHAUSTED",
    RefusalCode.SERVER_BUSY: "UNAVAILABLE",  # gRPC's "transient, retry with backoff"; agents already do
    RefusalCode.STREAM_IDLE: "DEADLINE_EXCEEDED",
    RefusalCode.STREAM_DEADLINE: "DEADLINE_EXCEEDED",
    RefusalCode.HEADER_TOO_LARGE: "INVALID_ARGUMENT",
    RefusalCode.BAD_FILE: "INVALID_ARGUMENT",
    RefusalCode.BAD_FORMAT: "INVALID_ARGUMENT",
    RefusalCode.INDEX_MISMATCH: "INVALID_ARGUMENT",
    RefusalCode.META_MISMATCH: "INVALID_ARGUMENT",
    RefusalCode.BAD_NUM_EXAMPLES: "INVALID_ARGUMENT",
    RefusalCode.WRONG_KEYS: "INVALID_ARGUMENT",
    RefusalCode.BAD_SHAPE: "INVALID_ARGUMENT",
    RefusalCode.BAD_DTYPE: "INVALID_ARGUMENT",
    RefusalCode.NON_FINITE: "INVALID_ARGUMENT",
    RefusalCode.STALE_ROUND: "FAILED_PRECONDITION",
    RefusalCode.NOT_SAMPLED: "PERMISSION_DENIED",
    RefusalCode.UPLOAD_CONFLICT: "ALREADY_EXISTS",
    RefusalCode.NO_VERSION: "NOT_FOUND",
    RefusalCode.INTERNAL: "INTERNAL",
}
"""The one table from refusal code to gRPC status name (`grpc.StatusCode[name]`); total over `RefusalCode`."""


class Refused(PrufedError):
    """A refused call or update: `.code` picks the status, the one-line message names the field or fault."""

    def __init__(self, code: RefusalCode, message: str):
        self.code = RefusalCode(code)
        super().__init__(message)
