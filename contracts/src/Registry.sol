// SPDX-License-Identifier: UNLICENSED
pragma solidity 0.8.28;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";

/// @title medkms registry
/// @notice On-chain control plane of the key service: patients' public keys, record anchors,
/// access grants and the key-fragment node directory. Holds hashes and metadata, never PHI.
/// @dev Views return zero structs for unknown items (callers test `patient == address(0)` or an
/// empty key) so that a node can judge a request with one `eth_call` that never reverts.
contract Registry is AccessControl {
    bytes32 public constant PROVIDER_ROLE = keccak256("PROVIDER_ROLE");
    bytes32 public constant NODE_ADMIN_ROLE = keccak256("NODE_ADMIN_ROLE");
    /// @notice Holders may open time-boxed emergency grants for patients who opted in. A window
    /// is in force only while its responder holds the role: revoking (or renouncing) it ends
    /// every window the responder has open (the views report them inactive).
    bytes32 public constant EMERGENCY_ROLE = keccak256("EMERGENCY_ROLE");

    /// @notice Number of record types (0 diagnosis .. 5 surgery); grants hold them as a bitmask.
    uint8 public constant RECORD_TYPE_COUNT = 6;
    uint256 private constant MAX_URI_BYTES = 256;
    uint256 private constant MAX_NODE_ID_BYTES = 32;
    uint256 private constant MAX_SIGNING_KEY_BYTES = 256;
    uint256 private constant MAX_SIGNATURE_BYTES = 256;
    uint256 private constant POINT_BYTES = 33;
    /// @notice Longest emergency grant a responder may open.
    uint64 public constant MAX_EMERGENCY_DURATION = 4 hours;
    /// @notice Emergency windows a responder may open on one opt-in: the patient opts in
    /// again (her own action) before the next ones. Bounds windows chained without her.
    uint8 public constant MAX_EMERGENCY_WINDOWS = 3;

    struct Patient {
        // One Umbral key per record type (RECORD_TYPE_COUNT compressed secp256k1 points of
        // 33 bytes, in type order), so a kfrag for one type cannot open another.
        // Empty = not registered.
        bytes umbralKeys;
        bytes verifyingKey; // 33-byte compressed secp256k1 point
    }

    struct Record {
        address patient; // address(0) = unknown record
        uint8 recordType;
        bool active;
        uint64 createdAt;
        address creator;
        bytes32 contentHash;
        bytes32 capsuleHash;
        string storageUri;
    }

    struct Grant {
        bytes granteeUmbralKey; // empty = never granted
        uint64 expiresAt;
        uint32 allowedTypes;
        bool active;
        uint64 grantedAt;
        bool emergency; // opened by an emergency responder, not by the patient
    }

    struct EmergencyOptIn {
        bytes responderUmbralKey; // empty = never opted in
        uint32 allowedTypes;
        bool active;
        uint8 windowsOpened; // since the patient last opted in; at most MAX_EMERGENCY_WINDOWS
    }

    struct Node {
        string nodeId; // empty = unknown node
        string endpoint;
        bytes signingKey; // DER SubjectPublicKeyInfo of the node's HSM response-signing key
        bytes deliveryKey; // 33-byte compressed P-256 point: kfrags are sealed to it
        address account; // the node's Ethereum account (HSM key); anchors its checkpoints
        bool active;
    }

    struct Checkpoint {
        uint64 treeSize;
        bytes32 rootHash;
        uint64 timestamp;
        uint64 anchoredAt; // block number
    }

    error InvalidUmbralKey();
    error InvalidVerifyingKey();
    error PatientAlreadyRegistered();
    error PatientNotRegistered();
    error NotRecordWriter();
    error CapsuleAlreadyAnchored();
    error WriterNotProvider();
    error InvalidContentHash();
    error InvalidCapsuleHash();
    error InvalidRecordType();
    error InvalidStorageUri();
    error RecordNotFound();
    error NotRecordPatient();
    error RecordNotActive();
    error GranteeNotProvider();
    error GranteeIsPatient();
    error ExpiryInPast();
    error InvalidRecordTypes();
    error GrantNotActive();
    error InvalidNodeId();
    error InvalidEndpoint();
    error InvalidSigningKey();
    error NodeAlreadyRegistered();
    error NodeNotRegistered();
    error InvalidDeliveryKey();
    error InvalidNodeAccount();
    error NotNodeAccount();
    error CheckpointNotNewer();
    error InvalidCheckpoint();
    error ResponderNotEmergencyRole();
    error NotOptedIn();
    error InvalidEmergencyDuration();
    error GrantAlreadyActive();
    error EmergencyAccessAlreadyOpen();
    error NodeAccountInUse();
    error EmergencyWindowsExhausted();

    event PatientRegistered(address indexed patient, bytes umbralKeys, bytes verifyingKey);
    event RecordAnchored(
        bytes32 indexed recordId,
        address indexed patient,
        uint8 recordType,
        address creator,
        bytes32 contentHash,
        bytes32 capsuleHash
    );
    event RecordDeactivated(bytes32 indexed recordId, address indexed patient);
    event RecordWriterChanged(address indexed patient, address indexed writer, bool allowed);
    event AccessGranted(
        address indexed patient,
        address indexed grantee,
        bytes granteeUmbralKey,
        uint64 expiresAt,
        uint32 allowedTypes
    );
    event AccessRevoked(address indexed patient, address indexed grantee);
    event NodeRegistered(
        bytes32 indexed nodeKey,
        string nodeId,
        string endpoint,
        bytes signingKey,
        bytes deliveryKey,
        address account
    );
    event NodeStatusChanged(bytes32 indexed nodeKey, string nodeId, bool active);
    event CheckpointAnchored(
        bytes32 indexed nodeKey,
        string nodeId,
        uint64 treeSize,
        bytes32 rootHash,
        uint64 timestamp,
        bytes signature
    );
    event EmergencyOptInChanged(
        address indexed patient,
        address indexed responder,
        bytes responderUmbralKey,
        uint32 allowedTypes,
        bool active
    );
    /// @notice Watched by patients: a responder opened emergency access to their records.
    event EmergencyAccessOpened(
        address indexed patient,
        address indexed responder,
        bytes responderUmbralKey,
        uint64 expiresAt,
        uint32 allowedTypes
    );

    mapping(address => Patient) private _patients;
    mapping(bytes32 => Record) private _records;
    mapping(address => mapping(address => Grant)) private _grants; // patient => grantee
    mapping(bytes32 => Node) private _nodes; // keccak256(nodeId) => node
    mapping(bytes32 => Checkpoint) private _checkpoints; // keccak256(nodeId) => latest anchor
    mapping(address => mapping(address => EmergencyOptIn)) private _emergencyOptIns; // patient => responder
    bytes32[] private _nodeKeys;
    mapping(address => bool) private _nodeAccountTaken; // one account anchors for one node
    // capsule hash => the one record that carries it, for ever (deactivated records included)
    mapping(bytes32 => bytes32) private _capsuleRecords;
    mapping(address => mapping(address => bool)) private _recordWriters; // patient => provider

    constructor() {
        _grantRole(DEFAULT_ADMIN_ROLE, msg.sender);
        _grantRole(NODE_ADMIN_ROLE, msg.sender);
    }

    // ---------------------------------------------------------------- patients

    /// @notice Register the caller as a patient with her per-record-type Umbral public keys
    /// (RECORD_TYPE_COUNT compressed points, concatenated in type order) and kfrag-verifying key.
    function registerPatient(bytes calldata umbralKeys, bytes calldata verifyingKey) external {
        if (umbralKeys.length != POINT_BYTES * RECORD_TYPE_COUNT) revert InvalidUmbralKey();
        for (uint256 i = 0; i < RECORD_TYPE_COUNT; i++) {
            if (!_isCompressedPoint(umbralKeys[i * POINT_BYTES:(i + 1) * POINT_BYTES])) {
                revert InvalidUmbralKey();
            }
        }
        if (!_isCompressedPoint(verifyingKey)) revert InvalidVerifyingKey();
        Patient storage p = _patients[msg.sender];
        if (p.umbralKeys.length != 0) revert PatientAlreadyRegistered();
        p.umbralKeys = umbralKeys;
        p.verifyingKey = verifyingKey;
        emit PatientRegistered(msg.sender, umbralKeys, verifyingKey);
    }

    // ----------------------------------------------------------------- records

    /// @notice The id of the record that carries `capsuleHash` for `patient`. Ids are derived,
    /// never chosen: nobody can take a patient's record id first, and each capsule has one.
    function recordIdOf(address patient, bytes32 capsuleHash) public pure returns (bytes32) {
        return keccak256(abi.encode(patient, capsuleHash));
    }

    /// @notice Let `writer` (a provider) anchor records for the caller, or stop it.
    function setRecordWriter(address writer, bool allowed) external {
        if (_patients[msg.sender].umbralKeys.length == 0) revert PatientNotRegistered();
        if (writer == msg.sender) revert GranteeIsPatient();
        if (allowed && !hasRole(PROVIDER_ROLE, writer)) revert WriterNotProvider();
        _recordWriters[msg.sender][writer] = allowed;
        emit RecordWriterChanged(msg.sender, writer, allowed);
    }

    /// @notice Whether `writer` may anchor records for `patient` now (it must also still hold
    /// PROVIDER_ROLE).
    function isRecordWriter(address patient, address writer) public view returns (bool) {
        return _recordWriters[patient][writer] && hasRole(PROVIDER_ROLE, writer);
    }

    /// @notice Anchor an encrypted record, by the patient or a provider she authorised
    /// (setRecordWriter). A capsule is anchored once, for ever: a deactivated record's capsule
    /// can never come back under another record. Returns the record's id (recordIdOf).
    function anchorRecord(
        address patient,
        bytes32 contentHash,
        string calldata storageUri,
        uint8 recordType,
        bytes32 capsuleHash
    ) external returns (bytes32 recordId) {
        if (msg.sender != patient && !isRecordWriter(patient, msg.sender)) {
            revert NotRecordWriter();
        }
        if (_patients[patient].umbralKeys.length == 0) revert PatientNotRegistered();
        if (contentHash == bytes32(0)) revert InvalidContentHash();
        if (capsuleHash == bytes32(0)) revert InvalidCapsuleHash();
        if (_capsuleRecords[capsuleHash] != bytes32(0)) revert CapsuleAlreadyAnchored();
        if (recordType >= RECORD_TYPE_COUNT) revert InvalidRecordType();
        uint256 uriLength = bytes(storageUri).length;
        if (uriLength == 0 || uriLength > MAX_URI_BYTES) revert InvalidStorageUri();

        // Unique: the capsule is new, and the id hashes it with the patient.
        recordId = recordIdOf(patient, capsuleHash);
        _capsuleRecords[capsuleHash] = recordId;
        _records[recordId] = Record({
            patient: patient,
            recordType: recordType,
            active: true,
            createdAt: uint64(block.timestamp),
            creator: msg.sender,
            contentHash: contentHash,
            capsuleHash: capsuleHash,
            storageUri: storageUri
        });
        emit RecordAnchored(recordId, patient, recordType, msg.sender, contentHash, capsuleHash);
    }

    /// @notice Deactivate a record for good; nodes then refuse its capsule.
    function deactivateRecord(bytes32 recordId) external {
        Record storage r = _records[recordId];
        if (r.patient == address(0)) revert RecordNotFound();
        if (r.patient != msg.sender) revert NotRecordPatient();
        if (!r.active) revert RecordNotActive();
        r.active = false;
        emit RecordDeactivated(recordId, msg.sender);
    }

    // ------------------------------------------------------------------ grants

    /// @notice Grant (or replace the grant of) a provider access to the caller's records.
    /// @param allowedTypes bitmask with bit `recordType` set per allowed type
    function grantAccess(
        address grantee,
        bytes calldata granteeUmbralKey,
        uint64 expiresAt,
        uint32 allowedTypes
    ) external {
        if (_patients[msg.sender].umbralKeys.length == 0) revert PatientNotRegistered();
        if (grantee == msg.sender) revert GranteeIsPatient();
        if (!hasRole(PROVIDER_ROLE, grantee)) revert GranteeNotProvider();
        if (!_isCompressedPoint(granteeUmbralKey)) revert InvalidUmbralKey();
        if (expiresAt <= block.timestamp) revert ExpiryInPast();
        if (!_validTypes(allowedTypes)) revert InvalidRecordTypes();
        _grants[msg.sender][grantee] = Grant({
            granteeUmbralKey: granteeUmbralKey,
            expiresAt: expiresAt,
            allowedTypes: allowedTypes,
            active: true,
            grantedAt: uint64(block.timestamp),
            emergency: false
        });
        emit AccessGranted(msg.sender, grantee, granteeUmbralKey, expiresAt, allowedTypes);
    }

    /// @notice Revoke the caller's active grant to `grantee`. Revoking an emergency window
    /// also withdraws the opt-in that allowed it: the responder opens no other window until
    /// the patient opts in again.
    function revokeAccess(address grantee) external {
        Grant storage g = _grants[msg.sender][grantee];
        if (!g.active) revert GrantNotActive();
        g.active = false;
        emit AccessRevoked(msg.sender, grantee);
        if (g.emergency) {
            EmergencyOptIn storage o = _emergencyOptIns[msg.sender][grantee];
            if (o.active) {
                o.active = false;
                emit EmergencyOptInChanged(
                    msg.sender, grantee, o.responderUmbralKey, o.allowedTypes, false
                );
            }
        }
    }

    // --------------------------------------------------------------- emergency

    /// @notice Let `responder` (an emergency-role holder) open short emergency grants to the
    /// caller's records of `allowedTypes`, re-encrypted to `responderUmbralKey`. The patient
    /// then enrolls dormant kfrags for that key; nodes serve them only inside an open window.
    function optInEmergency(address responder, bytes calldata responderUmbralKey, uint32 allowedTypes)
        external
    {
        if (_patients[msg.sender].umbralKeys.length == 0) revert PatientNotRegistered();
        if (responder == msg.sender) revert GranteeIsPatient();
        if (!hasRole(EMERGENCY_ROLE, responder)) revert ResponderNotEmergencyRole();
        if (!_isCompressedPoint(responderUmbralKey)) revert InvalidUmbralKey();
        if (!_validTypes(allowedTypes)) revert InvalidRecordTypes();
        // New terms apply to the next window only: an open one is closed now.
        _closeEmergencyGrant(msg.sender, responder);
        _emergencyOptIns[msg.sender][responder] = EmergencyOptIn({
            responderUmbralKey: responderUmbralKey,
            allowedTypes: allowedTypes,
            active: true,
            windowsOpened: 0
        });
        emit EmergencyOptInChanged(msg.sender, responder, responderUmbralKey, allowedTypes, true);
    }

    /// @notice Withdraw an opt-in; an emergency grant it allowed is closed at once.
    function optOutEmergency(address responder) external {
        EmergencyOptIn storage o = _emergencyOptIns[msg.sender][responder];
        if (!o.active) revert NotOptedIn();
        o.active = false;
        _closeEmergencyGrant(msg.sender, responder);
        emit EmergencyOptInChanged(msg.sender, responder, o.responderUmbralKey, o.allowedTypes, false);
    }

    /// @notice Open emergency access to `patient`'s records for `duration` seconds (at most
    /// MAX_EMERGENCY_DURATION), on the terms the patient opted in to. A window cannot be
    /// extended: the next one opens only after this one ends (expired). A patient's revoke
    /// withdraws the opt-in, and at most MAX_EMERGENCY_WINDOWS open on one opt-in.
    function openEmergencyAccess(address patient, uint64 duration) external onlyRole(EMERGENCY_ROLE) {
        EmergencyOptIn storage o = _emergencyOptIns[patient][msg.sender];
        if (!o.active) revert NotOptedIn();
        if (duration == 0 || duration > MAX_EMERGENCY_DURATION) revert InvalidEmergencyDuration();
        Grant storage existing = _grants[patient][msg.sender];
        if (existing.active && existing.expiresAt > block.timestamp) {
            if (existing.emergency) revert EmergencyAccessAlreadyOpen();
            revert GrantAlreadyActive();
        }
        if (o.windowsOpened >= MAX_EMERGENCY_WINDOWS) revert EmergencyWindowsExhausted();
        o.windowsOpened += 1;
        uint64 expiresAt = uint64(block.timestamp) + duration;
        _grants[patient][msg.sender] = Grant({
            granteeUmbralKey: o.responderUmbralKey,
            expiresAt: expiresAt,
            allowedTypes: o.allowedTypes,
            active: true,
            grantedAt: uint64(block.timestamp),
            emergency: true
        });
        emit EmergencyAccessOpened(patient, msg.sender, o.responderUmbralKey, expiresAt, o.allowedTypes);
    }

    // ------------------------------------------------------------------- nodes

    /// @notice Add a key-fragment node to the directory (active from the start).
    function registerNode(
        string calldata nodeId,
        string calldata endpoint,
        bytes calldata signingKey,
        bytes calldata deliveryKey,
        address account
    ) external onlyRole(NODE_ADMIN_ROLE) {
        uint256 idLength = bytes(nodeId).length;
        if (idLength == 0 || idLength > MAX_NODE_ID_BYTES) revert InvalidNodeId();
        uint256 endpointLength = bytes(endpoint).length;
        if (endpointLength == 0 || endpointLength > MAX_URI_BYTES) revert InvalidEndpoint();
        if (signingKey.length == 0 || signingKey.length > MAX_SIGNING_KEY_BYTES) {
            revert InvalidSigningKey();
        }
        if (!_isCompressedPoint(deliveryKey)) revert InvalidDeliveryKey();
        if (account == address(0)) revert InvalidNodeAccount();
        bytes32 nodeKey = keccak256(bytes(nodeId));
        if (bytes(_nodes[nodeKey].nodeId).length != 0) revert NodeAlreadyRegistered();
        // Each node anchors its audit log from its own HSM-held account: one shared by two
        // nodes would let either anchor checkpoints in the other's name.
        if (_nodeAccountTaken[account]) revert NodeAccountInUse();
        _nodeAccountTaken[account] = true;
        _nodes[nodeKey] = Node({
            nodeId: nodeId,
            endpoint: endpoint,
            signingKey: signingKey,
            deliveryKey: deliveryKey,
            account: account,
            active: true
        });
        _nodeKeys.push(nodeKey);
        emit NodeRegistered(nodeKey, nodeId, endpoint, signingKey, deliveryKey, account);
    }

    /// @notice Take a node out of (or back into) service.
    function setNodeActive(string calldata nodeId, bool active) external onlyRole(NODE_ADMIN_ROLE) {
        bytes32 nodeKey = keccak256(bytes(nodeId));
        Node storage n = _nodes[nodeKey];
        if (bytes(n.nodeId).length == 0) revert NodeNotRegistered();
        n.active = active;
        emit NodeStatusChanged(nodeKey, nodeId, active);
    }

    // ------------------------------------------------------------- checkpoints

    /// @notice Anchor the node's latest signed audit checkpoint; sent from the node's own
    /// account. Tree sizes only grow: an auditor checks consistency between successive anchors.
    /// @param signature the node's HSM signature over the checkpoint (see core/audit.py)
    function anchorCheckpoint(
        string calldata nodeId,
        uint64 treeSize,
        bytes32 rootHash,
        uint64 timestamp,
        bytes calldata signature
    ) external {
        bytes32 nodeKey = keccak256(bytes(nodeId));
        Node storage n = _nodes[nodeKey];
        if (bytes(n.nodeId).length == 0) revert NodeNotRegistered();
        if (msg.sender != n.account) revert NotNodeAccount();
        if (treeSize == 0 || signature.length == 0 || signature.length > MAX_SIGNATURE_BYTES) {
            revert InvalidCheckpoint();
        }
        Checkpoint storage last = _checkpoints[nodeKey];
        if (treeSize <= last.treeSize) revert CheckpointNotNewer();
        _checkpoints[nodeKey] = Checkpoint({
            treeSize: treeSize,
            rootHash: rootHash,
            timestamp: timestamp,
            anchoredAt: uint64(block.number)
        });
        emit CheckpointAnchored(nodeKey, nodeId, treeSize, rootHash, timestamp, signature);
    }

    // ------------------------------------------------------------------- views

    function getPatient(address patient) external view returns (Patient memory) {
        return _patients[patient];
    }

    function getRecord(bytes32 recordId) external view returns (Record memory) {
        return _records[recordId];
    }

    /// @notice The record that carries `capsuleHash` (zero if none ever did).
    function recordOfCapsule(bytes32 capsuleHash) external view returns (bytes32) {
        return _capsuleRecords[capsuleHash];
    }

    function getGrant(address patient, address grantee) external view returns (Grant memory) {
        return _inForce(_grants[patient][grantee], grantee);
    }

    function getEmergencyOptIn(address patient, address responder)
        external
        view
        returns (EmergencyOptIn memory)
    {
        return _emergencyOptIns[patient][responder];
    }

    function latestCheckpoint(string calldata nodeId) external view returns (Checkpoint memory) {
        return _checkpoints[keccak256(bytes(nodeId))];
    }

    function nodeCount() external view returns (uint256) {
        return _nodeKeys.length;
    }

    function getNode(uint256 index) external view returns (Node memory node) {
        if (index < _nodeKeys.length) node = _nodes[_nodeKeys[index]];
    }

    /// @notice Everything a node needs to judge one request, read atomically at one block.
    /// @dev The grant is the one from the record's patient to `grantee`. `capsuleRetired`: the
    /// record that carries `capsuleHash` (whichever record the request names) is deactivated.
    function accessState(bytes32 recordId, address grantee, bytes32 capsuleHash)
        external
        view
        returns (
            Record memory record,
            Grant memory grant,
            bool capsuleRetired,
            uint256 blockNumber,
            uint256 blockTimestamp
        )
    {
        record = _records[recordId];
        grant = _inForce(_grants[record.patient][grantee], grantee);
        bytes32 carrier = _capsuleRecords[capsuleHash];
        capsuleRetired = carrier != bytes32(0) && !_records[carrier].active;
        blockNumber = block.number;
        blockTimestamp = block.timestamp;
    }

    function _isCompressedPoint(bytes calldata key) private pure returns (bool) {
        return key.length == POINT_BYTES && (key[0] == 0x02 || key[0] == 0x03);
    }

    /// @dev The grant as it stands: an emergency window whose responder no longer holds
    /// EMERGENCY_ROLE reads as inactive (it revives only if the role is given back before
    /// the window's expiry).
    function _inForce(Grant memory grant, address grantee) private view returns (Grant memory) {
        if (grant.emergency && grant.active && !hasRole(EMERGENCY_ROLE, grantee)) {
            grant.active = false;
        }
        return grant;
    }

    function _closeEmergencyGrant(address patient, address responder) private {
        Grant storage g = _grants[patient][responder];
        if (g.active && g.emergency) {
            g.active = false;
            emit AccessRevoked(patient, responder);
        }
    }

    function _validTypes(uint32 allowedTypes) private pure returns (bool) {
        return allowedTypes != 0 && allowedTypes < (uint32(1) << RECORD_TYPE_COUNT);
    }
}
