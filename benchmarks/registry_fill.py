"""A real registry on anvil filled with many patients, fast (issue 14's scale benchmark).

Each patient registers, anchors one record and grants one of a few hundred providers, by the
registry's own functions, so the chain holds exactly the events a real registry would. Speed
comes from anvil, not from shortcuts in the contract: every account is impersonated (no
signing, gas price 0 so no funding), automine is off, and transactions go in JSON-RPC batches
and are mined 4 000 at a time. Calldata is encoded once per function and the
per-patient words spliced in.

The filled chain is dumped (``anvil_dumpState``, blocks and receipts included, gzipped) to
``benchmarks/cache/`` (not in git) and loaded from there next time (``--load-state``): filling
100 000 patients takes minutes, loading much less.
"""

from __future__ import annotations

import gzip
import http.client
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from eth_account import Account
from eth_hash.auto import keccak
from web3 import Web3

from contracts.build import load_artifact
from contracts.registry import RegistryClient
from contracts.registry_arguments import PROVIDER_ROLE
from core.addresses import checksum
from core.record_types import RecordType
from core.registry_types import record_id_of
from deploy.anvil import AnvilProcess, rpc_call, set_balance

CACHE_DIR: Final = Path(__file__).resolve().parent / "cache"
#: anvil as the fill needs it: any sender, no fees, no block gas limit
ANVIL_ARGS: Final = (
    "--auto-impersonate",
    "--base-fee",
    "0",
    "--no-priority-fee",
    "--disable-block-gas-limit",
)
PROVIDERS: Final = 200
#: patients per mined block (each phase: registrations, then records, then grants). Few,
#: large blocks: anvil's time to mine a block grows with the whole state (about 1 s at
#: 10 000 patients), but one block's logs must fit a node's 8 MiB answer bound.
PER_BLOCK: Final = 4000
#: transactions per JSON-RPC batch (anvil drops requests of a few MB)
SEND_BATCH: Final = 1000
_GAS: Final = hex(1_000_000)
#: placeholders in the calldata templates, replaced per patient
_ADDRESS: Final = "ab" * 20
_CONTENT: Final = "c1" * 32
_CAPSULE: Final = "c2" * 32
_KEY: Final = bytes.fromhex("02" + "5a" * 32)  # compressed-point form: all the registry checks
_TEN_YEARS_S: Final = 10 * 365 * 24 * 3600


def patient(i: int) -> str:
    return checksum(keccak(b"medkms-bench-patient" + i.to_bytes(8, "big"))[:20])


def provider(i: int) -> str:
    return checksum(keccak(b"medkms-bench-provider" + (i % PROVIDERS).to_bytes(8, "big"))[:20])


def capsule(i: int) -> bytes:
    return keccak(b"medkms-bench-capsule" + i.to_bytes(8, "big"))


def record(i: int) -> bytes:
    return record_id_of(patient(i), capsule(i))


@dataclass(frozen=True)
class FilledChain:
    registry: str
    patients: int
    #: seconds the fill took, or None when loaded from the cache
    fill_s: float | None


class _Batches:
    """JSON-RPC batches over one kept-alive connection."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        assert parts.hostname is not None
        self._conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
        self._ids = 0

    def call(self, calls: list[tuple[str, list[Any]]]) -> list[Any]:
        body = []
        for method, params in calls:
            self._ids += 1
            body.append({"jsonrpc": "2.0", "id": self._ids, "method": method, "params": params})
        self._conn.request(
            "POST", "/", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        answers = json.loads(self._conn.getresponse().read())
        failed = [a["error"] for a in answers if "error" in a]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(calls)} calls failed, first: {failed[0]}")
        return [a["result"] for a in answers]

    def close(self) -> None:
        self._conn.close()


def _templates() -> dict[str, _Template]:
    """Calldata (hex, no 0x) of each function the fill calls, with placeholders."""
    contract = Web3().eth.contract(abi=load_artifact()["abi"])
    placeholder = Web3.to_checksum_address("0x" + _ADDRESS)
    templates = {
        "register": contract.encode_abi("registerPatient", [_KEY * len(RecordType), _KEY]),
        "anchor": contract.encode_abi(
            "anchorRecord",
            [
                placeholder,
                bytes.fromhex(_CONTENT),
                "blob:bench",
                int(RecordType.LAB_RESULT),
                bytes.fromhex(_CAPSULE),
            ],
        ),
        "grant": contract.encode_abi(
            "grantAccess",
            [placeholder, _KEY, int(time.time()) + _TEN_YEARS_S, 1 << RecordType.LAB_RESULT],
        ),
        "provider": contract.encode_abi("grantRole", [PROVIDER_ROLE, placeholder]),
    }
    slots = {"register": (), "anchor": (_ADDRESS, _CONTENT, _CAPSULE)}
    return {
        name: _Template(data.removeprefix("0x"), *slots.get(name, (_ADDRESS,)))
        for name, data in templates.items()
    }


class _Template:
    """Calldata with placeholder words, filled in at the placeholders' places (not by
    search-and-replace: a filled-in value may run into the next placeholder's bytes)."""

    def __init__(self, data: str, *placeholders: str) -> None:
        self._parts: list[str] = []
        at = 0
        for placeholder in placeholders:
            start = data.index(placeholder, at)
            self._parts.append(data[at:start])
            at = start + len(placeholder)
        self._parts.append(data[at:])

    def fill(self, *values: str) -> str:
        out = [self._parts[0]]
        for value, part in zip(values, self._parts[1:], strict=True):
            out += (value, part)
        return "".join(out)


def _tx(sender: str, nonce: int, to: str, data: str) -> tuple[str, list[Any]]:
    """``nonce`` is given: anvil numbers a batch's transactions of one sender unreliably."""
    tx = {"from": sender, "to": to, "data": "0x" + data, "gas": _GAS, "gasPrice": "0x0"}
    return "eth_sendTransaction", [{**tx, "nonce": hex(nonce)}]


def _mined(batches: _Batches, registry: str, calls: list[tuple[str, list[Any]]]) -> None:
    """Send ``calls`` and mine them in one block. Every one must have succeeded: each emits
    one registry event (counted in one call; anvil looks receipts up slowly, one by one)."""
    for first in range(0, len(calls), SEND_BATCH):
        batches.call(calls[first : first + SEND_BATCH])
    batches.call([("evm_mine", [])])
    (number,) = batches.call([("eth_blockNumber", [])])  # after: a batch's calls may overlap
    query = {"address": registry, "fromBlock": number, "toBlock": number}
    (logs,) = batches.call([("eth_getLogs", [query])])
    if len(logs) != len(calls):
        raise RuntimeError(f"{len(calls) - len(logs)} of {len(calls)} fill transactions failed")


def fill(rpc_url: str, patients: int) -> str:
    """Deploy a registry on the anvil at ``rpc_url`` (started with ANVIL_ARGS) and fill it
    with ``patients`` patients, each with one record and one grant; its address."""
    admin = Account.create()
    set_balance(rpc_url, admin.address, 10**21)
    registry = RegistryClient.deploy(rpc_url, admin).address
    templates = _templates()
    admin_nonce = int(rpc_call(rpc_url, "eth_getTransactionCount", [admin.address, "latest"]), 16)
    rpc_call(rpc_url, "evm_setAutomine", [False])
    batches = _Batches(rpc_url)
    try:
        role = templates["provider"]
        _mined(
            batches,
            registry,
            [
                _tx(admin.address, admin_nonce + i, registry, role.fill(p[2:].lower()))
                for i, p in enumerate(sorted({provider(i) for i in range(PROVIDERS)}))
            ],
        )
        for first in range(0, patients, PER_BLOCK):
            block = range(first, min(patients, first + PER_BLOCK))
            senders = [patient(i) for i in block]
            _mined(
                batches,
                registry,
                [_tx(s, 0, registry, templates["register"].fill()) for s in senders],
            )
            _mined(
                batches,
                registry,
                [
                    _tx(
                        s,
                        1,
                        registry,
                        templates["anchor"].fill(
                            s[2:].lower(), keccak(capsule(i)).hex(), capsule(i).hex()
                        ),
                    )
                    for i, s in zip(block, senders, strict=True)
                ],
            )
            _mined(
                batches,
                registry,
                [
                    _tx(
                        s,
                        2,
                        registry,
                        templates["grant"].fill(provider(i)[2:].lower()),
                    )
                    for i, s in zip(block, senders, strict=True)
                ],
            )
    finally:
        batches.close()
    rpc_call(rpc_url, "evm_setAutomine", [True])
    return registry


def cached_chain(patients: int, work_dir: Path) -> tuple[AnvilProcess, FilledChain]:
    """A running anvil holding a registry filled with ``patients`` patients: loaded from
    ``CACHE_DIR`` if it holds one, else filled now and saved there. The caller stops it."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    state = CACHE_DIR / f"registry_{patients}.state.json.gz"
    meta = CACHE_DIR / f"registry_{patients}.json"
    if state.exists() and meta.exists():
        loaded = work_dir / "state.json"
        loaded.write_bytes(gzip.decompress(state.read_bytes()))
        anvil = AnvilProcess(
            log_path=work_dir / "anvil.log",
            extra_args=(*ANVIL_ARGS, "--load-state", str(loaded)),
            startup_timeout_s=600,
        ).start()
        return anvil, FilledChain(json.loads(meta.read_text())["registry"], patients, None)
    anvil = AnvilProcess(
        log_path=work_dir / "anvil.log", extra_args=ANVIL_ARGS, startup_timeout_s=60
    ).start()
    try:
        started = time.perf_counter()
        registry = fill(anvil.rpc_url, patients)
        fill_s = time.perf_counter() - started
        batches = _Batches(anvil.rpc_url)  # the dump is larger than rpc_call reads, by design
        try:
            (dumped,) = batches.call([("anvil_dumpState", [])])
        finally:
            batches.close()
    except BaseException:
        anvil.stop()  # the caller gets no process to stop
        raise
    state.write_bytes(bytes.fromhex(dumped.removeprefix("0x")))  # gzip, as anvil gives it
    meta.write_text(json.dumps({"registry": registry, "patients": patients}) + "\n")
    return anvil, FilledChain(registry, patients, fill_s)
