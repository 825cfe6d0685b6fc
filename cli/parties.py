"""How a `kmsctl` command finds its party's material: either the party's own files (an
encrypted keystore and a connection profile; what every party uses in production) or,
for the local cluster only, a demo identity of the cluster's state directory
(``--state-dir`` and ``--as NAME``).

With ``--keystore FILE --profile FILE`` nothing of any other party is read: other parties
are named by their DID (or 0x address), and a grantee by the public identity file it
sent (``kmsctl account public``). The keystore's password comes from a file
(``--password-file``), an environment variable (``--password-env VAR``), or a prompt on
the terminal; never from an argument, since arguments are visible to every user of the
machine.
"""

from __future__ import annotations

import argparse
import getpass
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from clients.sdk.blob_store import LocalBlobStore
from clients.sdk.connection_profile import ConnectionProfile
from clients.sdk.identity import Identity, PublicIdentity
from contracts.registry import RegistryClient
from core import addresses
from core.did import did_of, parse_did
from core.errors import ConfigurationError, InvalidRequest
from core.local_files import read_regular_file
from deploy.local_cluster import LocalCluster
from proto.transport import Transport

DEFAULT_STATE_DIR: Final = Path(".state")
#: a password file holds one line
MAX_PASSWORD_FILE_BYTES: Final = 4096


def add_password_options(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--password-file",
        type=Path,
        metavar="FILE",
        help="the keystore's password: the first line of FILE (mode 0600)",
    )
    source.add_argument(
        "--password-env",
        metavar="VAR",
        help="the keystore's password: the environment variable VAR (default: a prompt)",
    )


def add_party_options(parser: argparse.ArgumentParser, *, default_name: str) -> None:
    """--keystore/--profile/--blob-dir (a party's own files), or --state-dir/--as (the
    local cluster's demo identities)."""
    own = parser.add_argument_group("a party's own files")
    own.add_argument("--keystore", type=Path, metavar="FILE", help="the party's keystore")
    own.add_argument("--profile", type=Path, metavar="FILE", help="the connection profile")
    own.add_argument(
        "--blob-dir", type=Path, metavar="DIR", help="where records' blobs live (with --profile)"
    )
    add_password_options(parser)
    local = parser.add_argument_group("the local cluster")
    local.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help=f"the local cluster's state (default: {DEFAULT_STATE_DIR})",
    )
    local.add_argument(
        "--as", dest="as_", metavar="NAME", help=f"demo identity name (default: {default_name})"
    )
    parser.set_defaults(default_name=default_name)


def read_password(args: argparse.Namespace, *, confirm: bool = False) -> str:
    """The password from the one source the command line names (a prompt by default)."""
    if args.password_file is not None:
        password = _password_file(args.password_file)
    elif args.password_env is not None:
        value = os.environ.get(args.password_env)
        if value is None:
            raise ConfigurationError(f"environment variable {args.password_env} is not set")
        password = value
    else:
        if not sys.stdin.isatty():
            raise ConfigurationError(
                "no password: pass --password-file FILE or --password-env VAR, "
                "or run in a terminal to be asked"
            )
        password = getpass.getpass(f"password for {args.keystore}: ")
        if confirm and getpass.getpass("again: ") != password:
            raise InvalidRequest("the passwords differ")
    if not password:
        raise InvalidRequest("the password is empty")
    return password


def _password_file(path: Path) -> str:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigurationError(f"password file {path} is open to others: chmod 600 {path}")
    raw = read_regular_file(path, max_bytes=MAX_PASSWORD_FILE_BYTES, what="password file")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise InvalidRequest(f"password file {path} is not UTF-8 text") from None
    return text.splitlines()[0] if text else ""


def identity_from_keystore(args: argparse.Namespace) -> Identity:
    return Identity.from_keystore(args.keystore, read_password(args))


def registry_of(profile: ConnectionProfile) -> RegistryClient:
    """The profile's registry, once its chain answers with the profile's chain id (a
    profile for another chain would sign for the wrong domain)."""
    registry = RegistryClient(profile.chain_rpc_url, profile.registry_address)
    actual = registry.chain_id()
    if actual != profile.chain_id:
        raise ConfigurationError(
            f"profile {profile.path} names chain {profile.chain_id}, "
            f"but the chain at its URL is chain {actual}"
        )
    return registry


def address_of(ref: str, chain_id: int) -> str:
    """The account a DID on chain ``chain_id``, or a 0x address, names."""
    if ref.startswith("did:"):
        did = parse_did(ref)
        if did.chain_id != chain_id:
            raise InvalidRequest(
                f"{ref} is an account on chain {did.chain_id}, not on this profile's chain "
                f"{chain_id}"
            )
        return did.address
    if addresses.is_valid(ref):
        return addresses.checksum(ref)
    raise InvalidRequest(
        f"name a party by its DID (did:pkh:eip155:{chain_id}:0x...) or its 0x address"
    )


@dataclass(frozen=True)
class Party:
    """The party a command acts as, and how it reaches the system."""

    identity: Identity
    registry: RegistryClient
    chain_id: int
    coordinator_address: str
    transport: Transport
    blobs: LocalBlobStore
    #: the cluster's threshold (state directory) or the profile's, if it names one
    threshold: int | None
    #: state-directory mode: others are the cluster's demo identities, named by name
    cluster: LocalCluster | None

    def did(self, address: str) -> str:
        return did_of(self.chain_id, address)

    def address_of(self, ref: str) -> str:
        """Another party's account: a demo identity's name (state directory), or a DID
        or 0x address."""
        if self.cluster is not None:
            return self.cluster.identity(ref).address
        return address_of(ref, self.chain_id)

    def keys_of(self, ref: str) -> tuple[str, bytes]:
        """A grantee's account and Umbral receiving key: a demo identity's name (state
        directory), or the public identity file it sent."""
        if self.cluster is not None:
            grantee = self.cluster.identity(ref)
            return grantee.address, grantee.umbral_public_key()
        public = PublicIdentity.load(Path(ref))
        return self.address_of(str(public.did)), public.umbral_public_key

    def grant_threshold(self, requested: int) -> int:
        if requested:
            return requested
        if self.threshold is None:
            raise ConfigurationError("the profile names no threshold: add one or pass --threshold")
        return self.threshold


def party(args: argparse.Namespace) -> Party:
    """The party of a patient, provider or emergency command."""
    if args.keystore is not None or args.profile is not None:
        return _own_files(args)
    if args.blob_dir is not None or args.password_file is not None or args.password_env:
        raise ConfigurationError(
            "--blob-dir and a password source go with --keystore and --profile"
        )
    cluster = LocalCluster.open(args.state_dir or DEFAULT_STATE_DIR)
    registry = cluster.registry()
    return Party(
        identity=cluster.identity(args.as_ or args.default_name),
        registry=registry,
        chain_id=registry.chain_id(),
        coordinator_address=cluster.coordinator_address,
        transport=cluster.app_transport,
        blobs=cluster.blob_store(),
        threshold=cluster.threshold,
        cluster=cluster,
    )


def _own_files(args: argparse.Namespace) -> Party:
    if args.keystore is None or args.profile is None:
        raise ConfigurationError("a party's own files are --keystore FILE and --profile FILE: both")
    if args.state_dir is not None or args.as_ is not None:
        raise ConfigurationError("--state-dir and --as are for the local cluster, not a keystore")
    if args.blob_dir is None:
        raise ConfigurationError("--blob-dir DIR is required with --profile: where blobs live")
    profile = ConnectionProfile.load(args.profile)
    coordinator, ca_cert = profile.coordinator()
    identity = identity_from_keystore(args)
    return Party(
        identity=identity,
        registry=registry_of(profile),
        chain_id=profile.chain_id,
        coordinator_address=coordinator,
        transport=Transport.tls(ca_cert),
        blobs=LocalBlobStore(args.blob_dir),
        threshold=profile.threshold,
        cluster=None,
    )
