"""How the coordinator reaches the nodes: what it asks of one (:class:`NodeClient`),
the factory it is given to connect to each (:data:`NodeClientFactory`), the real
factory over gRPC channels (:class:`NodeChannels`), and the turn-taking between a
node's connections (:class:`RoundRobin`).

The composition root (``cli/coordinator.py``) gives the coordinator the real factory;
tests give it one that returns their fakes.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import grpc

from coordinator.settings import NodeAddress
from proto.kms.v1 import common_pb2, node_pb2
from proto.stubs import AioNodeStub
from proto.transport import Transport


class NodeClient(Protocol):
    """The calls the coordinator makes to a node; each raises ``grpc.RpcError`` when
    the node answers with an error status or not at all."""

    def GetNodeInfo(
        self, request: node_pb2.GetNodeInfoRequest, *, timeout: float
    ) -> Awaitable[node_pb2.NodeInfo]: ...

    def EnrollKeyFragment(
        self, request: common_pb2.EnrollKeyFragmentRequest, *, timeout: float
    ) -> Awaitable[common_pb2.EnrollKeyFragmentResponse]: ...

    def Reencrypt(
        self, request: common_pb2.ReencryptionRequest, *, timeout: float
    ) -> Awaitable[node_pb2.ReencryptResponse]: ...

    def ReencryptBatch(
        self, request: common_pb2.ReencryptionBatchRequest, *, timeout: float
    ) -> Awaitable[node_pb2.ReencryptBatchResponse]: ...

    def ReencryptMany(
        self, request: node_pb2.ReencryptManyRequest, *, timeout: float
    ) -> Awaitable[node_pb2.ReencryptManyResponse]: ...


#: opens one connection to a node; called inside the running event loop
NodeClientFactory = Callable[[NodeAddress], NodeClient]


class NodeChannels:
    """The real :data:`NodeClientFactory`: each call opens a new channel to the node, with
    its own TCP connection, and keeps it to be closed."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._channels: list[grpc.aio.Channel] = []

    def connect(self, node: NodeAddress) -> NodeClient:
        """A stub over a new channel to ``node``; call inside the running loop.

        The channel checks that the node's certificate names that node's id, so one
        node cannot answer in another's place even on a shared address."""
        # A local subchannel pool gives each channel its own TCP connection, so that
        # a node's processes (which share its port per connection) all get work.
        # A node that comes back is used again quickly: the transport's channels bound
        # their reconnect backoff (proto.rpc.RECONNECT_OPTIONS).
        options = [("grpc.use_local_subchannel_pool", 1)]
        channel = self._transport.aio_channel(
            node.address, options=options, server_name=node.node_id
        )
        self._channels.append(channel)
        return AioNodeStub(channel)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


class RoundRobin:
    """A node's clients, one per connection, taken in turn."""

    def __init__(self, clients: Sequence[NodeClient]) -> None:
        self._clients = itertools.cycle(clients)

    def next(self) -> NodeClient:
        return next(self._clients)
