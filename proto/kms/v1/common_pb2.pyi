from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ReencryptionRequest(_message.Message):
    __slots__ = ("request_id", "patient", "record_id", "capsule", "requester", "requester_umbral_key", "purpose_of_use")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PATIENT_FIELD_NUMBER: _ClassVar[int]
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    CAPSULE_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_UMBRAL_KEY_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_OF_USE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    patient: bytes
    record_id: bytes
    capsule: bytes
    requester: bytes
    requester_umbral_key: bytes
    purpose_of_use: str
    def __init__(self, request_id: _Optional[str] = ..., patient: _Optional[bytes] = ..., record_id: _Optional[bytes] = ..., capsule: _Optional[bytes] = ..., requester: _Optional[bytes] = ..., requester_umbral_key: _Optional[bytes] = ..., purpose_of_use: _Optional[str] = ...) -> None: ...

class CapsuleFragment(_message.Message):
    __slots__ = ("node_id", "cfrag")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CFRAG_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    cfrag: bytes
    def __init__(self, node_id: _Optional[str] = ..., cfrag: _Optional[bytes] = ...) -> None: ...
