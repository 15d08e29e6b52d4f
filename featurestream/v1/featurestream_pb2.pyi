import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FeatureStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEATURE_STATUS_UNSPECIFIED: _ClassVar[FeatureStatus]
    PRESENT: _ClassVar[FeatureStatus]
    MISSING: _ClassVar[FeatureStatus]
    STALE: _ClassVar[FeatureStatus]
    INVALID: _ClassVar[FeatureStatus]
FEATURE_STATUS_UNSPECIFIED: FeatureStatus
PRESENT: FeatureStatus
MISSING: FeatureStatus
STALE: FeatureStatus
INVALID: FeatureStatus

class Value(_message.Message):
    __slots__ = ("int64_value", "double_value", "string_value", "bool_value", "timestamp_value")
    INT64_VALUE_FIELD_NUMBER: _ClassVar[int]
    DOUBLE_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_VALUE_FIELD_NUMBER: _ClassVar[int]
    int64_value: int
    double_value: float
    string_value: str
    bool_value: bool
    timestamp_value: _timestamp_pb2.Timestamp
    def __init__(self, int64_value: _Optional[int] = ..., double_value: _Optional[float] = ..., string_value: _Optional[str] = ..., bool_value: _Optional[bool] = ..., timestamp_value: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class FeatureValue(_message.Message):
    __slots__ = ("value", "status", "event_time")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    value: Value
    status: FeatureStatus
    event_time: _timestamp_pb2.Timestamp
    def __init__(self, value: _Optional[_Union[Value, _Mapping]] = ..., status: _Optional[_Union[FeatureStatus, str]] = ..., event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class EntityKey(_message.Message):
    __slots__ = ("join_keys",)
    class JoinKeysEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    JOIN_KEYS_FIELD_NUMBER: _ClassVar[int]
    join_keys: _containers.ScalarMap[str, str]
    def __init__(self, join_keys: _Optional[_Mapping[str, str]] = ...) -> None: ...

class FeatureRow(_message.Message):
    __slots__ = ("entity", "timestamp", "values")
    ENTITY_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    entity: EntityKey
    timestamp: _timestamp_pb2.Timestamp
    values: _containers.RepeatedCompositeFieldContainer[FeatureValue]
    def __init__(self, entity: _Optional[_Union[EntityKey, _Mapping]] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., values: _Optional[_Iterable[_Union[FeatureValue, _Mapping]]] = ...) -> None: ...

class FeatureRows(_message.Message):
    __slots__ = ("feature_names", "rows")
    FEATURE_NAMES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    feature_names: _containers.RepeatedScalarFieldContainer[str]
    rows: _containers.RepeatedCompositeFieldContainer[FeatureRow]
    def __init__(self, feature_names: _Optional[_Iterable[str]] = ..., rows: _Optional[_Iterable[_Union[FeatureRow, _Mapping]]] = ...) -> None: ...

class GetOnlineFeaturesRequest(_message.Message):
    __slots__ = ("entities", "features", "feature_service")
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SERVICE_FIELD_NUMBER: _ClassVar[int]
    entities: _containers.RepeatedCompositeFieldContainer[EntityKey]
    features: _containers.RepeatedScalarFieldContainer[str]
    feature_service: str
    def __init__(self, entities: _Optional[_Iterable[_Union[EntityKey, _Mapping]]] = ..., features: _Optional[_Iterable[str]] = ..., feature_service: _Optional[str] = ...) -> None: ...

class AsOfRow(_message.Message):
    __slots__ = ("entity", "timestamp")
    ENTITY_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    entity: EntityKey
    timestamp: _timestamp_pb2.Timestamp
    def __init__(self, entity: _Optional[_Union[EntityKey, _Mapping]] = ..., timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetFeaturesAsOfRequest(_message.Message):
    __slots__ = ("rows", "features", "feature_service", "as_of_arrival")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SERVICE_FIELD_NUMBER: _ClassVar[int]
    AS_OF_ARRIVAL_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[AsOfRow]
    features: _containers.RepeatedScalarFieldContainer[str]
    feature_service: str
    as_of_arrival: bool
    def __init__(self, rows: _Optional[_Iterable[_Union[AsOfRow, _Mapping]]] = ..., features: _Optional[_Iterable[str]] = ..., feature_service: _Optional[str] = ..., as_of_arrival: _Optional[bool] = ...) -> None: ...

class StreamFeatureUpdatesRequest(_message.Message):
    __slots__ = ("entities", "features", "feature_service")
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SERVICE_FIELD_NUMBER: _ClassVar[int]
    entities: _containers.RepeatedCompositeFieldContainer[EntityKey]
    features: _containers.RepeatedScalarFieldContainer[str]
    feature_service: str
    def __init__(self, entities: _Optional[_Iterable[_Union[EntityKey, _Mapping]]] = ..., features: _Optional[_Iterable[str]] = ..., feature_service: _Optional[str] = ...) -> None: ...

class PushEventsRequest(_message.Message):
    __slots__ = ("source", "events")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    source: str
    events: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, source: _Optional[str] = ..., events: _Optional[_Iterable[bytes]] = ...) -> None: ...

class Rejection(_message.Message):
    __slots__ = ("index", "reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    reason: str
    def __init__(self, index: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class PushEventsResponse(_message.Message):
    __slots__ = ("accepted", "rejected")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    rejected: _containers.RepeatedCompositeFieldContainer[Rejection]
    def __init__(self, accepted: _Optional[int] = ..., rejected: _Optional[_Iterable[_Union[Rejection, _Mapping]]] = ...) -> None: ...

class ListFeaturesRequest(_message.Message):
    __slots__ = ("query",)
    QUERY_FIELD_NUMBER: _ClassVar[int]
    query: str
    def __init__(self, query: _Optional[str] = ...) -> None: ...

class FeatureInfo(_message.Message):
    __slots__ = ("name", "view_version", "description", "owner", "tags", "dtype", "aggregation", "window", "pii", "max_age", "entity", "join_keys", "source", "reads")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VIEW_VERSION_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    PII_FIELD_NUMBER: _ClassVar[int]
    MAX_AGE_FIELD_NUMBER: _ClassVar[int]
    ENTITY_FIELD_NUMBER: _ClassVar[int]
    JOIN_KEYS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    READS_FIELD_NUMBER: _ClassVar[int]
    name: str
    view_version: int
    description: str
    owner: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    dtype: str
    aggregation: str
    window: str
    pii: str
    max_age: str
    entity: str
    join_keys: _containers.RepeatedScalarFieldContainer[str]
    source: str
    reads: int
    def __init__(self, name: _Optional[str] = ..., view_version: _Optional[int] = ..., description: _Optional[str] = ..., owner: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., dtype: _Optional[str] = ..., aggregation: _Optional[str] = ..., window: _Optional[str] = ..., pii: _Optional[str] = ..., max_age: _Optional[str] = ..., entity: _Optional[str] = ..., join_keys: _Optional[_Iterable[str]] = ..., source: _Optional[str] = ..., reads: _Optional[int] = ...) -> None: ...

class ListFeaturesResponse(_message.Message):
    __slots__ = ("features",)
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedCompositeFieldContainer[FeatureInfo]
    def __init__(self, features: _Optional[_Iterable[_Union[FeatureInfo, _Mapping]]] = ...) -> None: ...

class DescribeFeatureRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...
