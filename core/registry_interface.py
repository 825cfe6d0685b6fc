"""What a party may ask of the registry, as interfaces: the seam between the code that
judges or acts on the registry's state and the web3 adapter that reaches a chain.

``contracts.registry.RegistryClient`` implements both. The node, the SDK clients and the
auditor take these types, so each can be driven in a test by a plain in-memory twin and in
production by the real client, unchanged.

Reads at ``block=None`` are at the latest block. Each transaction returns its hash once it
is mined and succeeded (a revert raises ``ChainRejected``); ``block_of_transaction`` names
the block it landed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from eth_account.signers.local import LocalAccount

from core.record_types import RecordType
from core.registry_types import (
    AccessState,
    BlockRef,
    CheckpointAnchor,
    EmergencyOptIn,
    GrantInfo,
    NodeInfo,
    PatientInfo,
    RecordInfo,
)
from core.request_auth import Domain


class TxSigner(Protocol):
    """An account whose key lives elsewhere (e.g. a node's HSM): it signs a transaction
    dict and returns the raw signed bytes. ``LocalAccount`` senders are accepted too."""

    @property
    def address(self) -> str: ...

    def sign_raw_transaction(self, tx: dict[str, Any]) -> bytes: ...


Sender = LocalAccount | TxSigner


class AccessStateSource(Protocol):
    def access_state(self, record_id: bytes, grantee: str, capsule_hash: bytes) -> AccessState: ...


class GrantReader(Protocol):
    """The views that judge a request: what a node reads when its index cannot answer."""

    def block(self, identifier: int | str = "latest") -> BlockRef: ...
    def get_patient(self, address: str) -> PatientInfo | None: ...
    def get_grant(
        self, patient: str, grantee: str, *, block: int | None = None
    ) -> GrantInfo | None: ...
    def get_emergency_opt_in(self, patient: str, responder: str) -> EmergencyOptIn | None: ...
    def access_state(
        self, record_id: bytes, grantee: str, capsule_hash: bytes, *, block: int | None = None
    ) -> AccessState: ...


class RegistryReader(GrantReader, Protocol):
    """The registry's views: authoritative at the block read, one round trip each."""

    @property
    def address(self) -> str: ...

    def signing_domain(self) -> Domain: ...
    def latest_block(self) -> tuple[int, int]: ...
    def block_of_transaction(self, tx_hash: str) -> int: ...
    def get_record(self, record_id: bytes) -> RecordInfo | None: ...
    def list_nodes(self) -> list[NodeInfo]: ...
    def checkpoint_anchors(
        self, node_id: str, from_block: int = 0, to_block: int | None = None
    ) -> list[CheckpointAnchor]: ...


class PatientTransactions(Protocol):
    """What a patient (or a provider she authorised, for ``anchor_record``) sends."""

    def register_patient(
        self, patient: LocalAccount, umbral_public_keys: Sequence[bytes], verifying_key: bytes
    ) -> str: ...
    def anchor_record(
        self,
        sender: LocalAccount,
        *,
        patient: str,
        content_hash: bytes,
        storage_uri: str,
        record_type: RecordType,
        capsule_hash: bytes,
    ) -> str: ...
    def set_record_writer(self, patient: LocalAccount, writer: str, *, allowed: bool) -> str: ...
    def deactivate_record(self, patient: LocalAccount, record_id: bytes) -> str: ...
    def grant_access(
        self,
        patient: LocalAccount,
        *,
        grantee: str,
        grantee_umbral_key: bytes,
        expires_at: int,
        allowed_types_mask: int,
    ) -> str: ...
    def revoke_access(self, patient: LocalAccount, grantee: str) -> str: ...
    def opt_in_emergency(
        self,
        patient: LocalAccount,
        *,
        responder: str,
        responder_umbral_key: bytes,
        allowed_types_mask: int,
    ) -> str: ...
    def opt_out_emergency(self, patient: LocalAccount, responder: str) -> str: ...


class ProviderTransactions(Protocol):
    """What a provider with the emergency role sends."""

    def open_emergency_access(
        self, responder: LocalAccount, *, patient: str, duration_s: int
    ) -> str: ...


class PatientRegistry(RegistryReader, PatientTransactions, Protocol):
    """The registry as the patient's SDK client uses it."""


class ProviderRegistry(RegistryReader, ProviderTransactions, Protocol):
    """The registry as the provider's SDK client uses it."""
