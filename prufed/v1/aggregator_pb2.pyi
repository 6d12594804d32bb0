from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HardwareSummary(_message.Message):
    __slots__ = ("name", "accelerator", "total_memory_bytes", "budget_bytes", "bnb_4bit", "profile_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACCELERATOR_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    BNB_4BIT_FIELD_NUMBER: _ClassVar[int]
    PROFILE_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    accelerator: str
    total_memory_bytes: int
    budget_bytes: int
    bnb_4bit: bool
    profile_json: str
    def __init__(self, name: _Optional[str] = ..., accelerator: _Optional[str] = ..., total_memory_bytes: _Optional[int] = ..., budget_bytes: _Optional[int] = ..., bnb_4bit: _Optional[bool] = ..., profile_json: _Optional[str] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("hardware", "kept_layers", "base_model", "name")
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    KEPT_LAYERS_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    hardware: HardwareSummary
    kept_layers: _containers.RepeatedScalarFieldContainer[int]
    base_model: str
    name: str
    def __init__(self, hardware: _Optional[_Union[HardwareSummary, _Mapping]] = ..., kept_layers: _Optional[_Iterable[int]] = ..., base_model: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class LoraSpec(_message.Message):
    __slots__ = ("r", "alpha", "targets")
    R_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    r: int
    alpha: float
    targets: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, r: _Optional[int] = ..., alpha: _Optional[float] = ..., targets: _Optional[_Iterable[str]] = ...) -> None: ...

class TrainingParams(_message.Message):
    __slots__ = ("max_steps", "lr", "batch_size", "seq_len")
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    max_steps: int
    lr: float
    batch_size: int
    seq_len: int
    def __init__(self, max_steps: _Optional[int] = ..., lr: _Optional[float] = ..., batch_size: _Optional[int] = ..., seq_len: _Optional[int] = ...) -> None: ...

class FederationParams(_message.Message):
    __slots__ = ("base_model", "num_layers", "lora", "training", "rounds", "chunk_size", "max_upload_bytes")
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_UPLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    num_layers: int
    lora: LoraSpec
    training: TrainingParams
    rounds: int
    chunk_size: int
    max_upload_bytes: int
    def __init__(self, base_model: _Optional[str] = ..., num_layers: _Optional[int] = ..., lora: _Optional[_Union[LoraSpec, _Mapping]] = ..., training: _Optional[_Union[TrainingParams, _Mapping]] = ..., rounds: _Optional[int] = ..., chunk_size: _Optional[int] = ..., max_upload_bytes: _Optional[int] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("client_id", "token", "federation")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    token: str
    federation: FederationParams
    def __init__(self, client_id: _Optional[str] = ..., token: _Optional[str] = ..., federation: _Optional[_Union[FederationParams, _Mapping]] = ...) -> None: ...

class PullTaskRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Task(_message.Message):
    __slots__ = ("kind", "round", "global_version", "training", "retry_after_s", "deadline_unix", "reason")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Task.Kind]
        TASK: _ClassVar[Task.Kind]
        WAIT: _ClassVar[Task.Kind]
        DONE: _ClassVar[Task.Kind]
    KIND_UNSPECIFIED: Task.Kind
    TASK: Task.Kind
    WAIT: Task.Kind
    DONE: Task.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    kind: Task.Kind
    round: int
    global_version: int
    training: TrainingParams
    retry_after_s: float
    deadline_unix: float
    reason: str
    def __init__(self, kind: _Optional[_Union[Task.Kind, str]] = ..., round: _Optional[int] = ..., global_version: _Optional[int] = ..., training: _Optional[_Union[TrainingParams, _Mapping]] = ..., retry_after_s: _Optional[float] = ..., deadline_unix: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class DownloadHeader(_message.Message):
    __slots__ = ("version", "round", "total_bytes", "sha256", "kept_layers", "per_group")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    KEPT_LAYERS_FIELD_NUMBER: _ClassVar[int]
    PER_GROUP_FIELD_NUMBER: _ClassVar[int]
    version: int
    round: int
    total_bytes: int
    sha256: str
    kept_layers: _containers.RepeatedScalarFieldContainer[int]
    per_group: bool
    def __init__(self, version: _Optional[int] = ..., round: _Optional[int] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., kept_layers: _Optional[_Iterable[int]] = ..., per_group: _Optional[bool] = ...) -> None: ...

class DownloadChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: DownloadHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[DownloadHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class FederatedEval(_message.Message):
    __slots__ = ("loss", "examples")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    loss: float
    examples: int
    def __init__(self, loss: _Optional[float] = ..., examples: _Optional[int] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("round", "total_bytes", "tensors", "num_examples", "kept_layers", "eval")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    KEPT_LAYERS_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    round: int
    total_bytes: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorInfo]
    num_examples: int
    kept_layers: _containers.RepeatedScalarFieldContainer[int]
    eval: FederatedEval
    def __init__(self, round: _Optional[int] = ..., total_bytes: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorInfo, _Mapping]]] = ..., num_examples: _Optional[int] = ..., kept_layers: _Optional[_Iterable[int]] = ..., eval: _Optional[_Union[FederatedEval, _Mapping]] = ...) -> None: ...

class UploadTrailer(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    def __init__(self, sha256: _Optional[str] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("header", "data", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    data: bytes
    trailer: UploadTrailer
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., trailer: _Optional[_Union[UploadTrailer, _Mapping]] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("upload_id", "sha256", "accepted", "duplicate", "round")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    sha256: str
    accepted: bool
    duplicate: bool
    round: int
    def __init__(self, upload_id: _Optional[str] = ..., sha256: _Optional[str] = ..., accepted: _Optional[bool] = ..., duplicate: _Optional[bool] = ..., round: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RoundStatus(_message.Message):
    __slots__ = ("round", "state", "sampled", "uploads", "deadline_unix", "metrics_json", "eval_json")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    UPLOADS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    EVAL_JSON_FIELD_NUMBER: _ClassVar[int]
    round: int
    state: str
    sampled: int
    uploads: int
    deadline_unix: float
    metrics_json: str
    eval_json: str
    def __init__(self, round: _Optional[int] = ..., state: _Optional[str] = ..., sampled: _Optional[int] = ..., uploads: _Optional[int] = ..., deadline_unix: _Optional[float] = ..., metrics_json: _Optional[str] = ..., eval_json: _Optional[str] = ...) -> None: ...

class DepthCount(_message.Message):
    __slots__ = ("depth", "clients")
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    depth: int
    clients: int
    def __init__(self, depth: _Optional[int] = ..., clients: _Optional[int] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("global_version", "rounds_total", "rounds_closed", "done", "rounds", "clients_per_depth", "last_metrics_json", "mode", "groups_json")
    GLOBAL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_CLOSED_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_PER_DEPTH_FIELD_NUMBER: _ClassVar[int]
    LAST_METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    GROUPS_JSON_FIELD_NUMBER: _ClassVar[int]
    global_version: int
    rounds_total: int
    rounds_closed: int
    done: bool
    rounds: _containers.RepeatedCompositeFieldContainer[RoundStatus]
    clients_per_depth: _containers.RepeatedCompositeFieldContainer[DepthCount]
    last_metrics_json: str
    mode: str
    groups_json: str
    def __init__(self, global_version: _Optional[int] = ..., rounds_total: _Optional[int] = ..., rounds_closed: _Optional[int] = ..., done: _Optional[bool] = ..., rounds: _Optional[_Iterable[_Union[RoundStatus, _Mapping]]] = ..., clients_per_depth: _Optional[_Iterable[_Union[DepthCount, _Mapping]]] = ..., last_metrics_json: _Optional[str] = ..., mode: _Optional[str] = ..., groups_json: _Optional[str] = ...) -> None: ...
