"""The node's keys inside a PKCS#11 token (PyKCS11; SoftHSM2 in development), one idea per
module:

- :mod:`kms_node.hsm.pkcs11_key_store`: :class:`Pkcs11KeyStore`, the key store the node runs
  on, and :func:`ensure_keys` (``kms-node init``);
- :mod:`kms_node.hsm.pkcs11_session`: loading the PKCS#11 module, its lock, logging in to a
  token (the rules every call follows);
- :mod:`kms_node.hsm.key_specs`: what each key is and may do;
- :mod:`kms_node.hsm.token_keys`: finding and checking the node's keys, creating missing ones;
- :mod:`kms_node.hsm.kek_generations`: the key-encryption keys, one per generation;
- :mod:`kms_node.hsm.delivery_ecdh`: the key agreement that opens sealed kfrags;
- :mod:`kms_node.hsm.signing`: ECDSA with the signing key and the Ethereum account key;
- :mod:`kms_node.hsm.softhsm_token`: a node's own SoftHSM2 configuration and token.

Nothing is imported here: import each name from the module that defines it.
"""
