from proto.kms.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RelayEnrollmentsRequest(_message.Message):
    __slots__ = ("enrollments",)
    ENROLLMENTS_FIELD_NUMBER: _ClassVar[int]
    enrollments: _containers.RepeatedCompositeFieldContainer[_common_pb2.EnrollKeyFragmentRequest]
    def __init__(self, enrollments: _Optional[_Iterable[_Union[_common_pb2.EnrollKeyFragmentRequest, _Mapping]]] = ...) -> None: ...

class RelayedEnrollment(_message.Message):
    __slots__ = ("node_id", "response", "status", "reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    response: _common_pb2.EnrollKeyFragmentResponse
    status: str
    reason: str
    def __init__(self, node_id: _Optional[str] = ..., response: _Optional[_Union[_common_pb2.EnrollKeyFragmentResponse, _Mapping]] = ..., status: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RelayEnrollmentsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RelayedEnrollment]
    def __init__(self, results: _Optional[_Iterable[_Union[RelayedEnrollment, _Mapping]]] = ...) -> None: ...

class GetClusterInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeEndpoint(_message.Message):
    __slots__ = ("node_id", "address")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class ClusterInfo(_message.Message):
    __slots__ = ("threshold", "nodes")
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    threshold: int
    nodes: _containers.RepeatedCompositeFieldContainer[NodeEndpoint]
    def __init__(self, threshold: _Optional[int] = ..., nodes: _Optional[_Iterable[_Union[NodeEndpoint, _Mapping]]] = ...) -> None: ...

class GetClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("node_id", "index_block", "status", "reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_BLOCK_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    index_block: int
    status: str
    reason: str
    def __init__(self, node_id: _Optional[str] = ..., index_block: _Optional[int] = ..., status: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ClusterStatus(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeStatus]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeStatus, _Mapping]]] = ...) -> None: ...

class CoordinatorReencryptResponse(_message.Message):
    __slots__ = ("fragments", "threshold", "read_id")
    FRAGMENTS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    READ_ID_FIELD_NUMBER: _ClassVar[int]
    fragments: _containers.RepeatedCompositeFieldContainer[_common_pb2.CapsuleFragment]
    threshold: int
    read_id: bytes
    def __init__(self, fragments: _Optional[_Iterable[_Union[_common_pb2.CapsuleFragment, _Mapping]]] = ..., threshold: _Optional[int] = ..., read_id: _Optional[bytes] = ...) -> None: ...

class CapsuleFragments(_message.Message):
    __slots__ = ("record_id", "fragments", "status", "reason")
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    FRAGMENTS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    record_id: bytes
    fragments: _containers.RepeatedCompositeFieldContainer[_common_pb2.CapsuleFragment]
    status: str
    reason: str
    def __init__(self, record_id: _Optional[bytes] = ..., fragments: _Optional[_Iterable[_Union[_common_pb2.CapsuleFragment, _Mapping]]] = ..., status: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CoordinatorBatchResponse(_message.Message):
    __slots__ = ("results", "threshold", "read_id")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    READ_ID_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[CapsuleFragments]
    threshold: int
    read_id: bytes
    def __init__(self, results: _Optional[_Iterable[_Union[CapsuleFragments, _Mapping]]] = ..., threshold: _Optional[int] = ..., read_id: _Optional[bytes] = ...) -> None: ...

class ReportedFragment(_message.Message):
    __slots__ = ("record_id", "node_id")
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    record_id: bytes
    node_id: str
    def __init__(self, record_id: _Optional[bytes] = ..., node_id: _Optional[str] = ...) -> None: ...

class RetryReadRequest(_message.Message):
    __slots__ = ("read_id", "reported", "inconsistent")
    READ_ID_FIELD_NUMBER: _ClassVar[int]
    REPORTED_FIELD_NUMBER: _ClassVar[int]
    INCONSISTENT_FIELD_NUMBER: _ClassVar[int]
    read_id: bytes
    reported: _containers.RepeatedCompositeFieldContainer[ReportedFragment]
    inconsistent: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, read_id: _Optional[bytes] = ..., reported: _Optional[_Iterable[_Union[ReportedFragment, _Mapping]]] = ..., inconsistent: _Optional[_Iterable[bytes]] = ...) -> None: ...
