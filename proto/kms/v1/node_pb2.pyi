from proto.kms.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetNodeInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "software_version", "signing_public_key", "signing_algorithm", "delivery_public_key", "account", "registry_address", "chain_id", "index_block")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SIGNING_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNING_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CHAIN_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_BLOCK_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    software_version: str
    signing_public_key: bytes
    signing_algorithm: str
    delivery_public_key: bytes
    account: bytes
    registry_address: bytes
    chain_id: int
    index_block: int
    def __init__(self, node_id: _Optional[str] = ..., software_version: _Optional[str] = ..., signing_public_key: _Optional[bytes] = ..., signing_algorithm: _Optional[str] = ..., delivery_public_key: _Optional[bytes] = ..., account: _Optional[bytes] = ..., registry_address: _Optional[bytes] = ..., chain_id: _Optional[int] = ..., index_block: _Optional[int] = ...) -> None: ...

class ReencryptResponse(_message.Message):
    __slots__ = ("fragment",)
    FRAGMENT_FIELD_NUMBER: _ClassVar[int]
    fragment: _common_pb2.CapsuleFragment
    def __init__(self, fragment: _Optional[_Union[_common_pb2.CapsuleFragment, _Mapping]] = ...) -> None: ...

class ReencryptBatchResponse(_message.Message):
    __slots__ = ("outcomes",)
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[_common_pb2.CapsuleOutcome]
    def __init__(self, outcomes: _Optional[_Iterable[_Union[_common_pb2.CapsuleOutcome, _Mapping]]] = ...) -> None: ...

class NodeRead(_message.Message):
    __slots__ = ("single", "batch")
    SINGLE_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    single: _common_pb2.ReencryptionRequest
    batch: _common_pb2.ReencryptionBatchRequest
    def __init__(self, single: _Optional[_Union[_common_pb2.ReencryptionRequest, _Mapping]] = ..., batch: _Optional[_Union[_common_pb2.ReencryptionBatchRequest, _Mapping]] = ...) -> None: ...

class ReencryptManyRequest(_message.Message):
    __slots__ = ("reads",)
    READS_FIELD_NUMBER: _ClassVar[int]
    reads: _containers.RepeatedCompositeFieldContainer[NodeRead]
    def __init__(self, reads: _Optional[_Iterable[_Union[NodeRead, _Mapping]]] = ...) -> None: ...

class ReadRefusal(_message.Message):
    __slots__ = ("status", "message")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    status: str
    message: str
    def __init__(self, status: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class NodeReadResult(_message.Message):
    __slots__ = ("single", "batch", "refusal")
    SINGLE_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    single: ReencryptResponse
    batch: ReencryptBatchResponse
    refusal: ReadRefusal
    def __init__(self, single: _Optional[_Union[ReencryptResponse, _Mapping]] = ..., batch: _Optional[_Union[ReencryptBatchResponse, _Mapping]] = ..., refusal: _Optional[_Union[ReadRefusal, _Mapping]] = ...) -> None: ...

class ReencryptManyResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[NodeReadResult]
    def __init__(self, results: _Optional[_Iterable[_Union[NodeReadResult, _Mapping]]] = ...) -> None: ...
