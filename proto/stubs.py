"""Typed client stubs for the kms.v1 services.

Built from the .proto descriptors (method paths and message types are checked
against them at construction), so they cannot drift from the API, and typed,
unlike grpcio-tools' generated ``*_pb2_grpc`` modules.
"""

from __future__ import annotations

from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from proto.kms.v1 import audit_pb2, common_pb2, coordinator_pb2, node_pb2
from proto.rpc import method_path

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)

NODE_SERVICE = node_pb2.DESCRIPTOR.services_by_name["KmsNode"]
COORDINATOR_SERVICE = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"]
AUDIT_SERVICE = audit_pb2.DESCRIPTOR.services_by_name["Audit"]


def _unary(
    channel: grpc.Channel, service: Any, name: str, request: type[Req], response: type[Resp]
) -> grpc.UnaryUnaryMultiCallable[Req, Resp]:
    return channel.unary_unary(
        method_path(service, name, request, response),
        request_serializer=request.SerializeToString,
        response_deserializer=response.FromString,
    )


def _aio_unary(
    channel: grpc.aio.Channel, service: Any, name: str, request: type[Req], response: type[Resp]
) -> grpc.aio.UnaryUnaryMultiCallable[Req, Resp]:
    return channel.unary_unary(
        method_path(service, name, request, response),
        request_serializer=request.SerializeToString,
        response_deserializer=response.FromString,
    )


class NodeStub:
    def __init__(self, channel: grpc.Channel) -> None:
        self.GetNodeInfo = _unary(
            channel, NODE_SERVICE, "GetNodeInfo", node_pb2.GetNodeInfoRequest, node_pb2.NodeInfo
        )
        self.EnrollKeyFragment = _unary(
            channel,
            NODE_SERVICE,
            "EnrollKeyFragment",
            common_pb2.EnrollKeyFragmentRequest,
            common_pb2.EnrollKeyFragmentResponse,
        )
        self.Reencrypt = _unary(
            channel,
            NODE_SERVICE,
            "Reencrypt",
            common_pb2.ReencryptionRequest,
            node_pb2.ReencryptResponse,
        )

        self.ReencryptBatch = _unary(
            channel,
            NODE_SERVICE,
            "ReencryptBatch",
            common_pb2.ReencryptionBatchRequest,
            node_pb2.ReencryptBatchResponse,
        )
        self.ReencryptMany = _unary(
            channel,
            NODE_SERVICE,
            "ReencryptMany",
            node_pb2.ReencryptManyRequest,
            node_pb2.ReencryptManyResponse,
        )


class AioNodeStub:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.GetNodeInfo = _aio_unary(
            channel, NODE_SERVICE, "GetNodeInfo", node_pb2.GetNodeInfoRequest, node_pb2.NodeInfo
        )
        self.EnrollKeyFragment = _aio_unary(
            channel,
            NODE_SERVICE,
            "EnrollKeyFragment",
            common_pb2.EnrollKeyFragmentRequest,
            common_pb2.EnrollKeyFragmentResponse,
        )
        self.Reencrypt = _aio_unary(
            channel,
            NODE_SERVICE,
            "Reencrypt",
            common_pb2.ReencryptionRequest,
            node_pb2.ReencryptResponse,
        )
        self.ReencryptBatch = _aio_unary(
            channel,
            NODE_SERVICE,
            "ReencryptBatch",
            common_pb2.ReencryptionBatchRequest,
            node_pb2.ReencryptBatchResponse,
        )
        self.ReencryptMany = _aio_unary(
            channel,
            NODE_SERVICE,
            "ReencryptMany",
            node_pb2.ReencryptManyRequest,
            node_pb2.ReencryptManyResponse,
        )


class CoordinatorStub:
    def __init__(self, channel: grpc.Channel) -> None:
        self.GetClusterInfo = _unary(
            channel,
            COORDINATOR_SERVICE,
            "GetClusterInfo",
            coordinator_pb2.GetClusterInfoRequest,
            coordinator_pb2.ClusterInfo,
        )
        self.GetClusterStatus = _unary(
            channel,
            COORDINATOR_SERVICE,
            "GetClusterStatus",
            coordinator_pb2.GetClusterStatusRequest,
            coordinator_pb2.ClusterStatus,
        )
        self.Reencrypt = _unary(
            channel,
            COORDINATOR_SERVICE,
            "Reencrypt",
            common_pb2.ReencryptionRequest,
            coordinator_pb2.CoordinatorReencryptResponse,
        )
        self.ReencryptBatch = _unary(
            channel,
            COORDINATOR_SERVICE,
            "ReencryptBatch",
            common_pb2.ReencryptionBatchRequest,
            coordinator_pb2.CoordinatorBatchResponse,
        )
        self.RetryReencrypt = _unary(
            channel,
            COORDINATOR_SERVICE,
            "RetryReencrypt",
            coordinator_pb2.RetryReadRequest,
            coordinator_pb2.CoordinatorReencryptResponse,
        )
        self.RetryReencryptBatch = _unary(
            channel,
            COORDINATOR_SERVICE,
            "RetryReencryptBatch",
            coordinator_pb2.RetryReadRequest,
            coordinator_pb2.CoordinatorBatchResponse,
        )
        self.EnrollKeyFragments = _unary(
            channel,
            COORDINATOR_SERVICE,
            "EnrollKeyFragments",
            coordinator_pb2.RelayEnrollmentsRequest,
            coordinator_pb2.RelayEnrollmentsResponse,
        )


class AuditStub:
    def __init__(self, channel: grpc.Channel) -> None:
        self.GetCheckpoint = _unary(
            channel,
            AUDIT_SERVICE,
            "GetCheckpoint",
            audit_pb2.GetCheckpointRequest,
            audit_pb2.SignedCheckpoint,
        )
        self.GetEntries: grpc.UnaryStreamMultiCallable[
            audit_pb2.GetEntriesRequest, audit_pb2.AuditLogEntry
        ] = channel.unary_stream(
            method_path(
                AUDIT_SERVICE, "GetEntries", audit_pb2.GetEntriesRequest, audit_pb2.AuditLogEntry
            ),
            request_serializer=audit_pb2.GetEntriesRequest.SerializeToString,
            response_deserializer=audit_pb2.AuditLogEntry.FromString,
        )
        self.GetInclusionProof = _unary(
            channel,
            AUDIT_SERVICE,
            "GetInclusionProof",
            audit_pb2.InclusionProofRequest,
            audit_pb2.InclusionProof,
        )
        self.GetConsistencyProof = _unary(
            channel,
            AUDIT_SERVICE,
            "GetConsistencyProof",
            audit_pb2.ConsistencyProofRequest,
            audit_pb2.ConsistencyProof,
        )
