"""`kmsctl admin`: the registry administrator's commands, from the admin's own keystore.

    kmsctl admin deploy --rpc-url URL [--profile-out FILE]
    kmsctl admin grant-provider|grant-emergency|revoke-emergency PARTY --profile FILE
    kmsctl admin register-node --identity FILE --endpoint HOST:PORT --profile FILE
    kmsctl admin deactivate-node|activate-node NODE_ID --profile FILE
    kmsctl admin fund PARTY --ether AMOUNT --profile FILE

Every command takes ``--keystore FILE`` and a password source (``--password-file``,
``--password-env``, or a prompt). ``deploy`` puts a new registry on any JSON-RPC chain;
the deploying account becomes its admin. ``register-node`` registers the public identity
a node operator sent (``kms-node init --identity-out FILE``), checked in full first.
A node pays gas for its checkpoint anchors: ``fund`` sends its account ether in a plain
transfer from the admin's account. PARTY is a DID or a 0x address.
"""

from __future__ import annotations

import argparse
import json
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Final

from cli.parties import add_password_options, address_of, identity_from_keystore, registry_of
from clients.sdk.connection_profile import ConnectionProfile
from clients.sdk.identity import Identity
from clients.sdk.input_files import load_json_object
from contracts.build import load_artifact
from contracts.chain_transport import WEI_PER_ETHER, ChainTransport
from contracts.registry import RegistryClient
from core.did import did_of
from core.endpoints import parse_host_port
from core.errors import InvalidRequest
from core.node_identity import MAX_NODE_IDENTITY_FILE_BYTES, parse_node_identity

#: a transfer larger than this is surely a typo (a node's anchors cost far less)
MAX_FUND_ETHER: Final = Decimal(1000)
_TIMEOUT_S: Final = 30.0


def cmd_deploy(args: argparse.Namespace) -> None:
    if args.profile_out is not None and args.profile_out.exists():
        raise InvalidRequest(f"{args.profile_out} exists: not overwritten")
    admin = identity_from_keystore(args)
    registry = RegistryClient.deploy(args.rpc_url, admin.account, timeout_s=_TIMEOUT_S)
    chain_id = registry.chain_id()
    start_block, _ = registry.latest_block()
    print(
        json.dumps(
            {
                "registry_address": registry.address,
                "chain_id": chain_id,
                "registry_start_block": start_block,
                "admin": did_of(chain_id, admin.address),
            },
            indent=2,
        )
    )
    if args.profile_out is not None:
        args.profile_out.write_text(
            f"chain_id = {chain_id}\n"
            f"chain_rpc_url = {json.dumps(args.rpc_url)}\n"
            f'registry_address = "{registry.address}"\n'
        )


def _connect(args: argparse.Namespace) -> tuple[Identity, RegistryClient, int]:
    profile = ConnectionProfile.load(args.profile)
    registry = registry_of(profile)
    return identity_from_keystore(args), registry, profile.chain_id


def cmd_role(args: argparse.Namespace) -> None:
    admin, registry, chain_id = _connect(args)
    party = address_of(args.party, chain_id)
    change = {
        "grant-provider": (registry.grant_provider_role, "granted PROVIDER_ROLE to"),
        "grant-emergency": (registry.grant_emergency_role, "granted EMERGENCY_ROLE to"),
        "revoke-emergency": (registry.revoke_emergency_role, "revoked EMERGENCY_ROLE of"),
    }
    send, what = change[args.action]
    tx = send(admin.account, party)
    print(f"{what} {did_of(chain_id, party)} (transaction {tx})")


def cmd_register_node(args: argparse.Namespace) -> None:
    try:
        data = load_json_object(
            args.identity,
            max_bytes=MAX_NODE_IDENTITY_FILE_BYTES,
            max_depth=1,
            what="node identity file",
        )
        node = parse_node_identity(data)
    except InvalidRequest as e:
        message = e.message
        if not message.startswith("node identity file"):
            message = f"node identity file {args.identity}: {message}"
        raise InvalidRequest(message) from None
    parse_host_port(args.endpoint, "--endpoint")
    admin, registry, chain_id = _connect(args)
    tx = registry.register_node(
        admin.account,
        node_id=node.node_id,
        endpoint=args.endpoint,
        signing_public_key=node.signing_public_key,
        delivery_public_key=node.delivery_public_key,
        account=node.account,
    )
    account = did_of(chain_id, node.account)
    print(f"registered {node.node_id} at {args.endpoint}, account {account} (transaction {tx})")
    print(f"it pays for its checkpoint anchors: fund it, e.g. kmsctl admin fund {account}")


def cmd_node_active(args: argparse.Namespace) -> None:
    admin, registry, _ = _connect(args)
    active = args.action == "activate-node"
    tx = registry.set_node_active(admin.account, node_id=args.node_id, active=active)
    print(f"{args.node_id} {'activated' if active else 'deactivated'} (transaction {tx})")


def ether_to_wei(ether: str) -> int:
    try:
        amount = Decimal(ether)
    except InvalidOperation:
        raise InvalidRequest(f"--ether must be a number, not {ether[:40]!r}") from None
    if not amount.is_finite() or not 0 < amount <= MAX_FUND_ETHER:
        raise InvalidRequest(f"--ether must be more than 0 and at most {MAX_FUND_ETHER}")
    wei = amount * WEI_PER_ETHER
    if wei != wei.to_integral_value():
        raise InvalidRequest("--ether has more than 18 decimals")
    return int(wei)


def cmd_fund(args: argparse.Namespace) -> None:
    wei = ether_to_wei(args.ether)
    admin, registry, chain_id = _connect(args)
    party = address_of(args.party, chain_id)
    chain = ChainTransport(registry.rpc_url, _TIMEOUT_S, load_artifact()["abi"])
    receipt = chain.transfer(admin.account, party, wei)
    balance = Decimal(chain.balance(party)) / WEI_PER_ETHER
    print(
        f"sent {args.ether} ether to {did_of(chain_id, party)} in block "
        f"{receipt['blockNumber']}; its balance is {balance} ether"
    )


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    admin = sub.add_parser(
        "admin", help="the registry administrator's commands (own keystore)"
    ).add_subparsers(dest="action", required=True)
    key = argparse.ArgumentParser(add_help=False)
    key.add_argument(
        "--keystore", type=Path, metavar="FILE", required=True, help="the admin's keystore"
    )
    add_password_options(key)
    profiled = argparse.ArgumentParser(add_help=False, parents=[key])
    profiled.add_argument(
        "--profile", type=Path, metavar="FILE", required=True, help="chain and registry"
    )

    deploy = admin.add_parser("deploy", parents=[key], help="deploy a new registry")
    deploy.add_argument("--rpc-url", required=True, help="the chain's JSON-RPC URL")
    deploy.add_argument(
        "--profile-out", type=Path, metavar="FILE", help="write a profile naming it to FILE"
    )
    deploy.set_defaults(func=cmd_deploy)
    for name, text in [
        ("grant-provider", "let an account anchor records for patients who allow it"),
        ("grant-emergency", "let an account open emergency grants"),
        ("revoke-emergency", "withdraw the emergency role (its open windows end at once)"),
    ]:
        role = admin.add_parser(name, parents=[profiled], help=text)
        role.add_argument("party", help="a DID or 0x address")
        role.set_defaults(func=cmd_role)
    register = admin.add_parser(
        "register-node", parents=[profiled], help="register a node from its identity file"
    )
    register.add_argument(
        "--identity", type=Path, metavar="FILE", required=True, help="from kms-node init"
    )
    register.add_argument(
        "--endpoint", required=True, metavar="HOST:PORT", help="where the node serves"
    )
    register.set_defaults(func=cmd_register_node)
    for name, text in [
        ("deactivate-node", "mark a node inactive: patients enroll no more kfrags at it"),
        ("activate-node", "bring a deactivated node back"),
    ]:
        node = admin.add_parser(name, parents=[profiled], help=text)
        node.add_argument("node_id")
        node.set_defaults(func=cmd_node_active)
    fund = admin.add_parser(
        "fund", parents=[profiled], help="send ether from the admin's account (node gas)"
    )
    fund.add_argument("party", help="a DID or 0x address, e.g. a node's account")
    fund.add_argument("--ether", required=True, help=f"amount, at most {MAX_FUND_ETHER}")
    fund.set_defaults(func=cmd_fund)
