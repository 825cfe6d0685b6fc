from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class RecordEnvelope(_message.Message):
    __slots__ = ("format_version", "record_id", "record_type", "capsule", "encrypted_dek", "nonce", "ciphertext", "media_type")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    RECORD_TYPE_FIELD_NUMBER: _ClassVar[int]
    CAPSULE_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTED_DEK_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    record_id: bytes
    record_type: str
    capsule: bytes
    encrypted_dek: bytes
    nonce: bytes
    ciphertext: bytes
    media_type: str
    def __init__(self, format_version: _Optional[int] = ..., record_id: _Optional[bytes] = ..., record_type: _Optional[str] = ..., capsule: _Optional[bytes] = ..., encrypted_dek: _Optional[bytes] = ..., nonce: _Optional[bytes] = ..., ciphertext: _Optional[bytes] = ..., media_type: _Optional[str] = ...) -> None: ...
