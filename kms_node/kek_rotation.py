"""Key-encryption key rotation, with the node stopped (``kms-node rotate-kek``).

1. A key-encryption key of the next generation is created in the HSM.
2. Every stored kfrag is unwrapped (under the generation that wrapped it) and wrapped
   again under the new one, in one SQLite transaction: all or none.
3. Only then are the older generations destroyed in the HSM; a kfrag copied from the
   store before the rotation (a backup) can no longer be opened with the live token.
   (A copy of a SoftHSM2 token taken before, with its PIN, still opens it: the software
   token's directory is the key; see docs/threat-model.md.)

Each step can be interrupted and the command run again: before the commit, the store is
unchanged and the new key is unused (the next run makes another and destroys both older
ones); after it, the old keys are only destroyed later.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from core.errors import IntegrityError
from kms_node.keystore import KeyStore
from kms_node.kfrag_store import KfragStore, StoredKfrag
from kms_node.service import kfrag_aad

log = structlog.get_logger("medkms.node.kek_rotation")


@dataclass(frozen=True)
class Rotation:
    node_id: str
    generation: int
    rewrapped: int
    destroyed: list[int]


def rotate_kek(keystore: KeyStore, kfrags: KfragStore, node_id: str) -> Rotation:
    """Wrap every kfrag again under a new key-encryption key and destroy the older ones.
    The caller holds the node's data directory alone (``data_lock.alone``)."""
    generation = keystore.add_kek_generation()

    def rewrap(item: StoredKfrag) -> tuple[bytes, int]:
        aad = kfrag_aad(node_id, item.patient, item.grantee, item.receiving_key, item.record_type)
        clear = keystore.unwrap(item.wrapped, aad, item.kek_generation)
        try:
            return keystore.wrap(clear, aad), generation
        finally:
            del clear

    rewrapped = kfrags.rewrap_all(rewrap)
    # Destroying a key that still wraps a kfrag would lose that kfrag for good: look first.
    left = kfrags.generations() - {generation}
    if left:
        raise IntegrityError(f"kfrags are still wrapped under generations {sorted(left)}")
    destroyed = keystore.destroy_kek_generations(keep=generation)
    log.info(
        "kek_rotated",
        node_id=node_id,
        generation=generation,
        rewrapped=rewrapped,
        destroyed=destroyed,
    )
    return Rotation(node_id, generation, rewrapped, destroyed)
