from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReencryptionRequest(_message.Message):
    __slots__ = ("request_id", "patient", "record_id", "capsule", "requester", "requester_umbral_key", "purpose_of_use", "deadline", "nonce", "signature", "record_type")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PATIENT_FIELD_NUMBER: _ClassVar[int]
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    CAPSULE_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_UMBRAL_KEY_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_OF_USE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    RECORD_TYPE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    patient: bytes
    record_id: bytes
    capsule: bytes
    requester: bytes
    requester_umbral_key: bytes
    purpose_of_use: str
    deadline: int
    nonce: bytes
    signature: bytes
    record_type: int
    def __init__(self, request_id: _Optional[str] = ..., patient: _Optional[bytes] = ..., record_id: _Optional[bytes] = ..., capsule: _Optional[bytes] = ..., requester: _Optional[bytes] = ..., requester_umbral_key: _Optional[bytes] = ..., purpose_of_use: _Optional[str] = ..., deadline: _Optional[int] = ..., nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., record_type: _Optional[int] = ...) -> None: ...

class CapsuleFragment(_message.Message):
    __slots__ = ("node_id", "cfrag", "receipt")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CFRAG_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    cfrag: bytes
    receipt: AuditReceipt
    def __init__(self, node_id: _Optional[str] = ..., cfrag: _Optional[bytes] = ..., receipt: _Optional[_Union[AuditReceipt, _Mapping]] = ...) -> None: ...

class AuditReceipt(_message.Message):
    __slots__ = ("node_id", "leaf_index", "tree_size", "entry_hash", "signature", "batch_start", "batch_size", "batch_path", "entry")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LEAF_INDEX_FIELD_NUMBER: _ClassVar[int]
    TREE_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENTRY_HASH_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    BATCH_START_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCH_PATH_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    leaf_index: int
    tree_size: int
    entry_hash: bytes
    signature: bytes
    batch_start: int
    batch_size: int
    batch_path: _containers.RepeatedScalarFieldContainer[bytes]
    entry: EntryFacts
    def __init__(self, node_id: _Optional[str] = ..., leaf_index: _Optional[int] = ..., tree_size: _Optional[int] = ..., entry_hash: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., batch_start: _Optional[int] = ..., batch_size: _Optional[int] = ..., batch_path: _Optional[_Iterable[bytes]] = ..., entry: _Optional[_Union[EntryFacts, _Mapping]] = ...) -> None: ...

class EntryFacts(_message.Message):
    __slots__ = ("time", "block_number", "block_hash", "reason_code", "reason")
    TIME_FIELD_NUMBER: _ClassVar[int]
    BLOCK_NUMBER_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    REASON_CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    time: int
    block_number: int
    block_hash: bytes
    reason_code: str
    reason: str
    def __init__(self, time: _Optional[int] = ..., block_number: _Optional[int] = ..., block_hash: _Optional[bytes] = ..., reason_code: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CapsuleRef(_message.Message):
    __slots__ = ("record_id", "capsule", "record_type")
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    CAPSULE_FIELD_NUMBER: _ClassVar[int]
    RECORD_TYPE_FIELD_NUMBER: _ClassVar[int]
    record_id: bytes
    capsule: bytes
    record_type: int
    def __init__(self, record_id: _Optional[bytes] = ..., capsule: _Optional[bytes] = ..., record_type: _Optional[int] = ...) -> None: ...

class ReencryptionBatchRequest(_message.Message):
    __slots__ = ("request_id", "patient", "capsules", "requester", "requester_umbral_key", "purpose_of_use", "deadline", "nonce", "signature")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PATIENT_FIELD_NUMBER: _ClassVar[int]
    CAPSULES_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_UMBRAL_KEY_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_OF_USE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    patient: bytes
    capsules: _containers.RepeatedCompositeFieldContainer[CapsuleRef]
    requester: bytes
    requester_umbral_key: bytes
    purpose_of_use: str
    deadline: int
    nonce: bytes
    signature: bytes
    def __init__(self, request_id: _Optional[str] = ..., patient: _Optional[bytes] = ..., capsules: _Optional[_Iterable[_Union[CapsuleRef, _Mapping]]] = ..., requester: _Optional[bytes] = ..., requester_umbral_key: _Optional[bytes] = ..., purpose_of_use: _Optional[str] = ..., deadline: _Optional[int] = ..., nonce: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class CapsuleOutcome(_message.Message):
    __slots__ = ("record_id", "fragment", "status", "reason", "receipt")
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    FRAGMENT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    record_id: bytes
    fragment: CapsuleFragment
    status: str
    reason: str
    receipt: AuditReceipt
    def __init__(self, record_id: _Optional[bytes] = ..., fragment: _Optional[_Union[CapsuleFragment, _Mapping]] = ..., status: _Optional[str] = ..., reason: _Optional[str] = ..., receipt: _Optional[_Union[AuditReceipt, _Mapping]] = ...) -> None: ...

class SealedKeyFragment(_message.Message):
    __slots__ = ("record_type", "ephemeral_public_key", "sealed")
    RECORD_TYPE_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SEALED_FIELD_NUMBER: _ClassVar[int]
    record_type: int
    ephemeral_public_key: bytes
    sealed: bytes
    def __init__(self, record_type: _Optional[int] = ..., ephemeral_public_key: _Optional[bytes] = ..., sealed: _Optional[bytes] = ...) -> None: ...

class EnrollKeyFragmentRequest(_message.Message):
    __slots__ = ("node_id", "patient", "grantee", "receiving_key", "kfrags", "deadline", "signature", "nonce")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PATIENT_FIELD_NUMBER: _ClassVar[int]
    GRANTEE_FIELD_NUMBER: _ClassVar[int]
    RECEIVING_KEY_FIELD_NUMBER: _ClassVar[int]
    KFRAGS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    patient: bytes
    grantee: bytes
    receiving_key: bytes
    kfrags: _containers.RepeatedCompositeFieldContainer[SealedKeyFragment]
    deadline: int
    signature: bytes
    nonce: bytes
    def __init__(self, node_id: _Optional[str] = ..., patient: _Optional[bytes] = ..., grantee: _Optional[bytes] = ..., receiving_key: _Optional[bytes] = ..., kfrags: _Optional[_Iterable[_Union[SealedKeyFragment, _Mapping]]] = ..., deadline: _Optional[int] = ..., signature: _Optional[bytes] = ..., nonce: _Optional[bytes] = ...) -> None: ...

class EnrollKeyFragmentResponse(_message.Message):
    __slots__ = ("node_id", "kfrag_sha256")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    KFRAG_SHA256_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    kfrag_sha256: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, node_id: _Optional[str] = ..., kfrag_sha256: _Optional[_Iterable[bytes]] = ...) -> None: ...
