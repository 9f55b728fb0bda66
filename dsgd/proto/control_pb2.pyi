from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_SHARD: _ClassVar[Role]
    ROLE_WORKER: _ClassVar[Role]
    ROLE_EVALUATOR: _ClassVar[Role]
ROLE_UNSPECIFIED: Role
ROLE_SHARD: Role
ROLE_WORKER: Role
ROLE_EVALUATOR: Role

class MemberStats(_message.Message):
    __slots__ = ("version", "step", "rate", "loss", "counters", "notes")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class NotesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RATE_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    version: int
    step: int
    rate: float
    loss: float
    counters: _containers.ScalarMap[str, float]
    notes: _containers.ScalarMap[str, str]
    def __init__(self, version: _Optional[int] = ..., step: _Optional[int] = ..., rate: _Optional[float] = ..., loss: _Optional[float] = ..., counters: _Optional[_Mapping[str, float]] = ..., notes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ShardEndpoint(_message.Message):
    __slots__ = ("shard_id", "data_address", "pub_address", "start", "stop", "incarnation", "control_address", "replica")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PUB_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    CONTROL_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    data_address: str
    pub_address: str
    start: int
    stop: int
    incarnation: int
    control_address: str
    replica: int
    def __init__(self, shard_id: _Optional[int] = ..., data_address: _Optional[str] = ..., pub_address: _Optional[str] = ..., start: _Optional[int] = ..., stop: _Optional[int] = ..., incarnation: _Optional[int] = ..., control_address: _Optional[str] = ..., replica: _Optional[int] = ...) -> None: ...

class RegisterShardRequest(_message.Message):
    __slots__ = ("shard_id", "endpoint", "layout_fingerprint", "version", "protocol_version", "replica", "following", "lineage")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    FOLLOWING_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    endpoint: ShardEndpoint
    layout_fingerprint: int
    version: int
    protocol_version: int
    replica: int
    following: int
    lineage: _containers.RepeatedCompositeFieldContainer[Incarnation]
    def __init__(self, shard_id: _Optional[int] = ..., endpoint: _Optional[_Union[ShardEndpoint, _Mapping]] = ..., layout_fingerprint: _Optional[int] = ..., version: _Optional[int] = ..., protocol_version: _Optional[int] = ..., replica: _Optional[int] = ..., following: _Optional[int] = ..., lineage: _Optional[_Iterable[_Union[Incarnation, _Mapping]]] = ...) -> None: ...

class Incarnation(_message.Message):
    __slots__ = ("incarnation", "started_from")
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    STARTED_FROM_FIELD_NUMBER: _ClassVar[int]
    incarnation: int
    started_from: int
    def __init__(self, incarnation: _Optional[int] = ..., started_from: _Optional[int] = ...) -> None: ...

class LeafShape(_message.Message):
    __slots__ = ("dims",)
    DIMS_FIELD_NUMBER: _ClassVar[int]
    dims: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, dims: _Optional[_Iterable[int]] = ...) -> None: ...

class ModelLayout(_message.Message):
    __slots__ = ("paths", "shapes", "num_shards", "fingerprint")
    PATHS_FIELD_NUMBER: _ClassVar[int]
    SHAPES_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    paths: _containers.RepeatedScalarFieldContainer[str]
    shapes: _containers.RepeatedCompositeFieldContainer[LeafShape]
    num_shards: int
    fingerprint: int
    def __init__(self, paths: _Optional[_Iterable[str]] = ..., shapes: _Optional[_Iterable[_Union[LeafShape, _Mapping]]] = ..., num_shards: _Optional[int] = ..., fingerprint: _Optional[int] = ...) -> None: ...

class RegisterShardReply(_message.Message):
    __slots__ = ("num_shards", "start", "stop", "layout_fingerprint", "config_json", "send_initial", "version", "ready", "waiting_for", "primary")
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    SEND_INITIAL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    num_shards: int
    start: int
    stop: int
    layout_fingerprint: int
    config_json: str
    send_initial: bool
    version: int
    ready: bool
    waiting_for: str
    primary: ShardEndpoint
    def __init__(self, num_shards: _Optional[int] = ..., start: _Optional[int] = ..., stop: _Optional[int] = ..., layout_fingerprint: _Optional[int] = ..., config_json: _Optional[str] = ..., send_initial: _Optional[bool] = ..., version: _Optional[int] = ..., ready: _Optional[bool] = ..., waiting_for: _Optional[str] = ..., primary: _Optional[_Union[ShardEndpoint, _Mapping]] = ...) -> None: ...

class FetchInitialShardRequest(_message.Message):
    __slots__ = ("shard_id", "layout_fingerprint")
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    layout_fingerprint: int
    def __init__(self, shard_id: _Optional[int] = ..., layout_fingerprint: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("name", "offset", "total", "data", "layout_fingerprint")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    name: str
    offset: int
    total: int
    data: bytes
    layout_fingerprint: int
    def __init__(self, name: _Optional[str] = ..., offset: _Optional[int] = ..., total: _Optional[int] = ..., data: _Optional[bytes] = ..., layout_fingerprint: _Optional[int] = ...) -> None: ...

class UploadInitialReply(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...

class RegisterWorkerRequest(_message.Message):
    __slots__ = ("worker_id", "layout_fingerprint", "model", "host", "protocol_version", "incarnation", "layout")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    worker_id: int
    layout_fingerprint: int
    model: str
    host: str
    protocol_version: int
    incarnation: int
    layout: ModelLayout
    def __init__(self, worker_id: _Optional[int] = ..., layout_fingerprint: _Optional[int] = ..., model: _Optional[str] = ..., host: _Optional[str] = ..., protocol_version: _Optional[int] = ..., incarnation: _Optional[int] = ..., layout: _Optional[_Union[ModelLayout, _Mapping]] = ...) -> None: ...

class RegisterWorkerReply(_message.Message):
    __slots__ = ("ready", "waiting_for", "worker_id", "partition", "num_partitions", "shards", "config_json", "send_initial")
    READY_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    NUM_PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    SEND_INITIAL_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    waiting_for: str
    worker_id: int
    partition: int
    num_partitions: int
    shards: _containers.RepeatedCompositeFieldContainer[ShardEndpoint]
    config_json: str
    send_initial: bool
    def __init__(self, ready: _Optional[bool] = ..., waiting_for: _Optional[str] = ..., worker_id: _Optional[int] = ..., partition: _Optional[int] = ..., num_partitions: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[ShardEndpoint, _Mapping]]] = ..., config_json: _Optional[str] = ..., send_initial: _Optional[bool] = ...) -> None: ...

class RegisterEvaluatorRequest(_message.Message):
    __slots__ = ("layout", "host", "protocol_version", "incarnation")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    layout: ModelLayout
    host: str
    protocol_version: int
    incarnation: int
    def __init__(self, layout: _Optional[_Union[ModelLayout, _Mapping]] = ..., host: _Optional[str] = ..., protocol_version: _Optional[int] = ..., incarnation: _Optional[int] = ...) -> None: ...

class RegisterEvaluatorReply(_message.Message):
    __slots__ = ("ready", "waiting_for", "shards", "config_json", "send_initial")
    READY_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    SEND_INITIAL_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    waiting_for: str
    shards: _containers.RepeatedCompositeFieldContainer[ShardEndpoint]
    config_json: str
    send_initial: bool
    def __init__(self, ready: _Optional[bool] = ..., waiting_for: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[ShardEndpoint, _Mapping]]] = ..., config_json: _Optional[str] = ..., send_initial: _Optional[bool] = ...) -> None: ...

class EvaluationReport(_message.Message):
    __slots__ = ("incarnation", "evaluation", "failure", "read")
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    READ_FIELD_NUMBER: _ClassVar[int]
    incarnation: int
    evaluation: Evaluation
    failure: str
    read: bool
    def __init__(self, incarnation: _Optional[int] = ..., evaluation: _Optional[_Union[Evaluation, _Mapping]] = ..., failure: _Optional[str] = ..., read: _Optional[bool] = ...) -> None: ...

class EvaluationReply(_message.Message):
    __slots__ = ("shutdown", "reason")
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    shutdown: bool
    reason: str
    def __init__(self, shutdown: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("role", "id", "incarnation", "stats", "leaving", "failure", "replica", "lost_primary", "caught_up", "joins", "chain", "beat")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    LEAVING_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    LOST_PRIMARY_FIELD_NUMBER: _ClassVar[int]
    CAUGHT_UP_FIELD_NUMBER: _ClassVar[int]
    JOINS_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    BEAT_FIELD_NUMBER: _ClassVar[int]
    role: Role
    id: int
    incarnation: int
    stats: MemberStats
    leaving: bool
    failure: str
    replica: int
    lost_primary: int
    caught_up: bool
    joins: int
    chain: _containers.RepeatedCompositeFieldContainer[ChainMember]
    beat: int
    def __init__(self, role: _Optional[_Union[Role, str]] = ..., id: _Optional[int] = ..., incarnation: _Optional[int] = ..., stats: _Optional[_Union[MemberStats, _Mapping]] = ..., leaving: _Optional[bool] = ..., failure: _Optional[str] = ..., replica: _Optional[int] = ..., lost_primary: _Optional[int] = ..., caught_up: _Optional[bool] = ..., joins: _Optional[int] = ..., chain: _Optional[_Iterable[_Union[ChainMember, _Mapping]]] = ..., beat: _Optional[int] = ...) -> None: ...

class ChainMember(_message.Message):
    __slots__ = ("replica", "incarnation", "joins")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    JOINS_FIELD_NUMBER: _ClassVar[int]
    replica: int
    incarnation: int
    joins: int
    def __init__(self, replica: _Optional[int] = ..., incarnation: _Optional[int] = ..., joins: _Optional[int] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("shutdown", "reason", "reregister", "shards", "primary", "replicas", "settling")
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REREGISTER_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    SETTLING_FIELD_NUMBER: _ClassVar[int]
    shutdown: bool
    reason: str
    reregister: bool
    shards: _containers.RepeatedCompositeFieldContainer[ShardEndpoint]
    primary: bool
    replicas: _containers.RepeatedCompositeFieldContainer[ShardEndpoint]
    settling: bool
    def __init__(self, shutdown: _Optional[bool] = ..., reason: _Optional[str] = ..., reregister: _Optional[bool] = ..., shards: _Optional[_Iterable[_Union[ShardEndpoint, _Mapping]]] = ..., primary: _Optional[bool] = ..., replicas: _Optional[_Iterable[_Union[ShardEndpoint, _Mapping]]] = ..., settling: _Optional[bool] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MemberStatus(_message.Message):
    __slots__ = ("role", "id", "state", "last_seen_seconds", "stats", "address", "incarnation", "replica", "primary", "promotable")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    PROMOTABLE_FIELD_NUMBER: _ClassVar[int]
    role: Role
    id: int
    state: str
    last_seen_seconds: float
    stats: MemberStats
    address: str
    incarnation: int
    replica: int
    primary: bool
    promotable: bool
    def __init__(self, role: _Optional[_Union[Role, str]] = ..., id: _Optional[int] = ..., state: _Optional[str] = ..., last_seen_seconds: _Optional[float] = ..., stats: _Optional[_Union[MemberStats, _Mapping]] = ..., address: _Optional[str] = ..., incarnation: _Optional[int] = ..., replica: _Optional[int] = ..., primary: _Optional[bool] = ..., promotable: _Optional[bool] = ...) -> None: ...

class Evaluation(_message.Message):
    __slots__ = ("elapsed_seconds", "test_accuracy", "test_loss", "total_version", "metrics", "eval_seconds", "examples", "final")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TEST_LOSS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_VERSION_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    EVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    elapsed_seconds: float
    test_accuracy: float
    test_loss: float
    total_version: int
    metrics: _containers.ScalarMap[str, float]
    eval_seconds: float
    examples: int
    final: bool
    def __init__(self, elapsed_seconds: _Optional[float] = ..., test_accuracy: _Optional[float] = ..., test_loss: _Optional[float] = ..., total_version: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., eval_seconds: _Optional[float] = ..., examples: _Optional[int] = ..., final: _Optional[bool] = ...) -> None: ...

class ClusterStatus(_message.Message):
    __slots__ = ("model", "num_params", "layout_fingerprint", "num_shards", "num_workers", "elapsed_seconds", "members", "history", "done", "done_reason", "reached_target", "waiting_for", "config_json", "shards", "refused", "failed", "target", "usage_error", "peak_rss_bytes", "lost_pushes", "failovers", "replicas")
    class RefusedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class LostPushesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    DONE_REASON_FIELD_NUMBER: _ClassVar[int]
    REACHED_TARGET_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    USAGE_ERROR_FIELD_NUMBER: _ClassVar[int]
    PEAK_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOST_PUSHES_FIELD_NUMBER: _ClassVar[int]
    FAILOVERS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    model: str
    num_params: int
    layout_fingerprint: int
    num_shards: int
    num_workers: int
    elapsed_seconds: float
    members: _containers.RepeatedCompositeFieldContainer[MemberStatus]
    history: _containers.RepeatedCompositeFieldContainer[Evaluation]
    done: bool
    done_reason: str
    reached_target: bool
    waiting_for: str
    config_json: str
    shards: _containers.RepeatedCompositeFieldContainer[ShardEndpoint]
    refused: _containers.ScalarMap[str, int]
    failed: bool
    target: str
    usage_error: bool
    peak_rss_bytes: float
    lost_pushes: _containers.ScalarMap[int, int]
    failovers: int
    replicas: _containers.RepeatedCompositeFieldContainer[ShardEndpoint]
    def __init__(self, model: _Optional[str] = ..., num_params: _Optional[int] = ..., layout_fingerprint: _Optional[int] = ..., num_shards: _Optional[int] = ..., num_workers: _Optional[int] = ..., elapsed_seconds: _Optional[float] = ..., members: _Optional[_Iterable[_Union[MemberStatus, _Mapping]]] = ..., history: _Optional[_Iterable[_Union[Evaluation, _Mapping]]] = ..., done: _Optional[bool] = ..., done_reason: _Optional[str] = ..., reached_target: _Optional[bool] = ..., waiting_for: _Optional[str] = ..., config_json: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[ShardEndpoint, _Mapping]]] = ..., refused: _Optional[_Mapping[str, int]] = ..., failed: _Optional[bool] = ..., target: _Optional[str] = ..., usage_error: _Optional[bool] = ..., peak_rss_bytes: _Optional[float] = ..., lost_pushes: _Optional[_Mapping[int, int]] = ..., failovers: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[ShardEndpoint, _Mapping]]] = ...) -> None: ...

class ShutdownRequest(_message.Message):
    __slots__ = ("reason", "wait_for_members")
    REASON_FIELD_NUMBER: _ClassVar[int]
    WAIT_FOR_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    reason: str
    wait_for_members: bool
    def __init__(self, reason: _Optional[str] = ..., wait_for_members: _Optional[bool] = ...) -> None: ...

class ShutdownReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class CheckpointPiece(_message.Message):
    __slots__ = ("file", "offset", "data", "last", "sha256", "manifest_json")
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    file: str
    offset: int
    data: bytes
    last: bool
    sha256: str
    manifest_json: str
    def __init__(self, file: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ..., sha256: _Optional[str] = ..., manifest_json: _Optional[str] = ...) -> None: ...
