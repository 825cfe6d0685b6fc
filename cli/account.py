"""`kmsctl account`: a party's own keystore.

    kmsctl account new    --keystore FILE [--chain-id N | --profile FILE]
    kmsctl account show   --keystore FILE [--chain-id N | --profile FILE]   # no password
    kmsctl account public --keystore FILE (--chain-id N | --profile FILE) [--out FILE]

``new`` creates an Ethereum account and writes it, encrypted under a password, to a new
keystore file (0600; an existing file is never overwritten). The party's Umbral keys
follow from it (ADR 11), so the file is the whole identity: back it up, and keep the
password apart. ``show`` prints the account and its DID from the file alone. ``public``
writes what a patient needs to grant the party access: its DID and Umbral receiving key.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cli.parties import add_password_options, read_password
from clients.sdk.connection_profile import ConnectionProfile
from clients.sdk.identity import Identity
from clients.sdk.keystore_file import read_keystore
from core.did import did_of
from core.errors import InvalidRequest


def _chain_id(args: argparse.Namespace) -> int | None:
    if args.profile is not None:
        return ConnectionProfile.load(args.profile).chain_id
    chain_id: int | None = args.chain_id
    return chain_id


def _describe(address: str, chain_id: int | None) -> dict[str, str]:
    shown = {"address": address}
    if chain_id is not None:
        shown["did"] = did_of(chain_id, address)
    return shown


def cmd_new(args: argparse.Namespace) -> None:
    if args.keystore.exists():
        raise InvalidRequest(f"{args.keystore} exists: a keystore is never overwritten")
    chain_id = _chain_id(args)
    identity = Identity.generate(args.keystore.stem)
    identity.to_keystore(args.keystore, read_password(args, confirm=True))
    print(json.dumps({**_describe(identity.address, chain_id), "keystore": str(args.keystore)}))


def cmd_show(args: argparse.Namespace) -> None:
    print(json.dumps(_describe(read_keystore(args.keystore).address, _chain_id(args))))


def cmd_public(args: argparse.Namespace) -> None:
    chain_id = _chain_id(args)
    if chain_id is None:
        raise InvalidRequest("a public identity names a chain: pass --chain-id N or --profile")
    identity = Identity.from_keystore(args.keystore, read_password(args))
    public = identity.public(chain_id).to_json()
    if args.out is not None:
        args.out.write_text(public)
    else:
        print(public, end="")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    account = sub.add_parser("account", help="a party's own keystore").add_subparsers(
        dest="action", required=True
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--keystore", type=Path, metavar="FILE", required=True)
    chain = common.add_mutually_exclusive_group()
    chain.add_argument("--chain-id", type=int, metavar="N", help="name the account as a DID on N")
    chain.add_argument("--profile", type=Path, metavar="FILE", help="the chain of this profile")
    new = account.add_parser("new", parents=[common], help="create an account in a new keystore")
    add_password_options(new)
    new.set_defaults(func=cmd_new)
    account.add_parser(
        "show", parents=[common], help="the keystore's account and DID (no password)"
    ).set_defaults(func=cmd_show)
    public = account.add_parser(
        "public", parents=[common], help="the DID and Umbral receiving key, for a patient's grant"
    )
    add_password_options(public)
    public.add_argument("--out", type=Path, metavar="FILE", help="write here instead of stdout")
    public.set_defaults(func=cmd_public)
