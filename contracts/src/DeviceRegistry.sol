// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {IDeviceRegistry, READING_HISTORY_SLOTS} from "./IDeviceRegistry.sol";
import {SlotClock} from "./SlotClock.sol";

/// @title DeviceRegistry
/// @notice Registry of field devices and the only door through which metered energy enters the
/// chain: readings are EIP-712 signed by the device key, bound to this chain and this contract,
/// consumed once (per-device nonce and strictly increasing slots) and capped by rated capacity.
/// A reading's nonce must exceed the device's last used one, not follow it exactly: gaps are
/// allowed, so a signed reading that never reaches the chain (failed for good in a relayer's
/// outbox, lost by the device, refused for its slot) costs that one reading, not every later
/// one. Nonces and slots both only move forward, so no reading is taken twice. OpenZeppelin's
/// `Nonces` takes only the exact next nonce, hence a nonce of our own, packed into the
/// device's record beside `lastSlot` (one storage write per reading instead of two).
/// It keeps the last READING_HISTORY_SLOTS slots of readings and totals, in rings: that a reading
/// was accepted once is guarded by the nonce and the device's last slot, not by the record, so
/// overwriting an old record reopens nothing.
contract DeviceRegistry is IDeviceRegistry, SlotClock, AccessControl, EIP712 {
    /// @notice Installers who may register and (de)activate devices.
    bytes32 public constant REGISTRAR_ROLE = keccak256("REGISTRAR_ROLE");
    /// @notice Maintenance staff who may raise alerts on any device.
    bytes32 public constant MAINTENANCE_ROLE = keccak256("MAINTENANCE_ROLE");

    /// @notice Typehash of the signed reading.
    bytes32 public constant READING_TYPEHASH =
        keccak256("Reading(address device,uint64 slot,int64 energyWh,uint256 nonce)");

    /// @notice Slots of readings and totals kept (READING_HISTORY_SLOTS, see IDeviceRegistry).
    uint64 public constant HISTORY_SLOTS = READING_HISTORY_SLOTS;
    /// @notice Seconds after a slot's end during which readings for it are accepted.
    uint64 public immutable readingWindow;
    /// @notice Slots of silence after which anyone may flag a device as stale.
    uint64 public immutable staleAfterSlots;

    /// @dev One ring entry of the meters' totals: those of `slot`, when `set`.
    struct SlotTotal {
        uint64 importWh;
        uint64 exportWh;
        uint64 slot;
        bool set;
    }

    /// @dev One ring entry of a device's readings: its reading of `slot`, when `recorded`.
    struct Recorded {
        int64 energyWh;
        uint64 slot;
        bool recorded;
    }

    mapping(address device => Device) private _devices;
    mapping(address device => Recorded[READING_HISTORY_SLOTS]) private _readings;
    SlotTotal[READING_HISTORY_SLOTS] private _slotTotals;
    mapping(address owner => address[]) private _meters;

    /// @param admin Receives DEFAULT_ADMIN_ROLE, REGISTRAR_ROLE and MAINTENANCE_ROLE.
    /// @param genesis_ Start of slot 0 (shared by the whole suite).
    /// @param readingWindow_ Seconds after a slot's end during which readings are accepted.
    /// @param staleAfterSlots_ Silence (in slots) that makes a device stale.
    constructor(address admin, uint64 genesis_, uint64 readingWindow_, uint64 staleAfterSlots_)
        SlotClock(genesis_)
        EIP712("DeviceRegistry", "1")
    {
        if (admin == address(0)) revert DeviceRegistryZeroAddress();
        readingWindow = readingWindow_;
        staleAfterSlots = staleAfterSlots_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(REGISTRAR_ROLE, admin);
        _grantRole(MAINTENANCE_ROLE, admin);
    }

    /// @inheritdoc IDeviceRegistry
    function registerDevice(address device, address owner, DeviceType deviceType, uint32 capacityW)
        external
        onlyRole(REGISTRAR_ROLE)
    {
        _register(device, owner, deviceType, capacityW);
    }

    /// @inheritdoc IDeviceRegistry
    function registerDevices(Registration[] calldata registrations) external onlyRole(REGISTRAR_ROLE) {
        for (uint256 i; i < registrations.length; ++i) {
            Registration calldata r = registrations[i];
            _register(r.device, r.owner, r.deviceType, r.capacityW);
        }
    }

    function _register(address device, address owner, DeviceType deviceType, uint32 capacityW) private {
        if (device == address(0) || owner == address(0)) revert DeviceRegistryZeroAddress();
        if (capacityW == 0) revert DeviceRegistryZeroCapacity();
        if (_devices[device].owner != address(0)) revert DeviceRegistryAlreadyRegistered(device);
        _devices[device] = Device({
            owner: owner,
            deviceType: deviceType,
            active: true,
            capacityW: capacityW,
            lastSlot: currentSlot(),
            lastSeen: uint64(block.timestamp),
            readings: 0,
            missedSlots: 0,
            nextNonce: 0
        });
        if (deviceType == DeviceType.Meter) _meters[owner].push(device);
        emit DeviceRegistered(device, owner, deviceType, capacityW);
    }

    /// @inheritdoc IDeviceRegistry
    function deactivateDevice(address device) external {
        Device storage d = _ownedOrRegistrar(device);
        if (!d.active) revert DeviceRegistryInactiveDevice(device);
        d.active = false;
        emit DeviceDeactivated(device, msg.sender);
    }

    /// @inheritdoc IDeviceRegistry
    /// @dev Only a registrar: an owner must not revive a device an installer took out of service.
    function reactivateDevice(address device) external onlyRole(REGISTRAR_ROLE) {
        Device storage d = _existing(device);
        if (d.active) revert DeviceRegistryAlreadyActive(device);
        d.active = true;
        emit DeviceReactivated(device, msg.sender);
    }

    /// @inheritdoc IDeviceRegistry
    function submitReading(Reading calldata reading, bytes calldata signature) external {
        _submit(reading, signature);
    }

    /// @inheritdoc IDeviceRegistry
    /// @dev All or nothing: one bad reading reverts the batch, so a relayer checks each first.
    function submitReadings(Reading[] calldata readings, bytes[] calldata signatures) external {
        if (readings.length != signatures.length) {
            revert DeviceRegistryLengthMismatch(readings.length, signatures.length);
        }
        for (uint256 i; i < readings.length; ++i) {
            _submit(readings[i], signatures[i]);
        }
    }

    function _submit(Reading calldata reading, bytes calldata signature) private {
        Device storage d = _existing(reading.device);
        if (!d.active) revert DeviceRegistryInactiveDevice(reading.device);
        address recovered = ECDSA.recover(readingDigest(reading), signature);
        if (recovered != reading.device) {
            revert DeviceRegistryInvalidSignature(reading.device, recovered);
        }
        // Any nonce from the next one on: a gap is a reading that never landed, not a replay.
        if (reading.nonce < d.nextNonce) {
            revert DeviceRegistryNonceTooLow(reading.device, reading.nonce, d.nextNonce);
        }
        if (reading.nonce >= type(uint64).max) {
            revert DeviceRegistryNonceTooHigh(reading.device, reading.nonce);
        }

        uint64 nowSlot = currentSlot();
        if (reading.slot >= nowSlot) revert DeviceRegistrySlotNotEnded(reading.slot, nowSlot);
        uint64 closesAt = slotStart(reading.slot + 1) + readingWindow;
        if (block.timestamp >= closesAt) revert DeviceRegistryReadingTooLate(reading.slot, closesAt);
        // The first reading may be for the registration slot; later ones must move forward.
        uint64 firstAllowed = d.readings == 0 ? d.lastSlot : d.lastSlot + 1;
        if (reading.slot < firstAllowed) {
            revert DeviceRegistrySlotNotAfterLast(reading.device, reading.slot, d.lastSlot);
        }
        uint64 cap = maxReadingWh(d.capacityW);
        uint64 magnitude =
            reading.energyWh < 0 ? uint64(-int64(reading.energyWh)) : uint64(reading.energyWh);
        if (magnitude > cap) {
            revert DeviceRegistryCapacityExceeded(reading.device, reading.energyWh, cap);
        }

        d.missedSlots += uint32(reading.slot - firstAllowed);
        d.lastSlot = reading.slot;
        d.lastSeen = uint64(block.timestamp);
        d.readings += 1;
        d.nextNonce = uint64(reading.nonce) + 1;
        _readings[reading.device][reading.slot % READING_HISTORY_SLOTS] =
            Recorded(reading.energyWh, reading.slot, true);
        if (d.deviceType == DeviceType.Meter) {
            SlotTotal storage total = _slotTotals[reading.slot % READING_HISTORY_SLOTS];
            // A slot's entry is reused READING_HISTORY_SLOTS slots later. With the suite's
            // window (600 s) the older slot's window closed long before; with a window of as
            // many slots or more (accelerated test clocks, where the chain's time stands still)
            // a later slot may hold the entry already: the late reading is refused, never added
            // to the later slot's totals.
            if (total.set && total.slot > reading.slot) {
                revert DeviceRegistrySlotTotalsEvicted(reading.slot, total.slot);
            }
            if (!total.set || total.slot != reading.slot) {
                total.importWh = 0;
                total.exportWh = 0;
                total.slot = reading.slot;
                total.set = true;
            }
            if (reading.energyWh >= 0) total.importWh += magnitude;
            else total.exportWh += magnitude;
        }
        emit ReadingRecorded(reading.device, reading.slot, reading.energyWh, reading.nonce);
    }

    /// @inheritdoc IDeviceRegistry
    function raiseAlert(address device, bytes32 reason) external onlyRole(MAINTENANCE_ROLE) {
        _existing(device);
        emit MaintenanceAlert(device, reason, msg.sender);
    }

    /// @inheritdoc IDeviceRegistry
    function flagStale(address device) external {
        Device storage d = _existing(device);
        if (!d.active) revert DeviceRegistryInactiveDevice(device);
        if (block.timestamp < d.lastSeen + staleAfterSlots * SLOT_SECONDS) {
            revert DeviceRegistryNotStale(device, d.lastSeen);
        }
        emit MaintenanceAlert(device, "stale", msg.sender);
    }

    /// @inheritdoc IDeviceRegistry
    function nonces(address device) external view returns (uint256) {
        return _devices[device].nextNonce;
    }

    /// @inheritdoc IDeviceRegistry
    function getDevice(address device) external view returns (Device memory) {
        return _devices[device];
    }

    /// @inheritdoc IDeviceRegistry
    function readingOf(address device, uint64 slot) external view returns (int64, bool) {
        Recorded memory r = _readings[device][slot % READING_HISTORY_SLOTS];
        if (!r.recorded || r.slot < slot) return (0, false);
        if (r.slot > slot) revert DeviceRegistryReadingEvicted(device, slot, r.slot);
        return (r.energyWh, true);
    }

    /// @inheritdoc IDeviceRegistry
    function slotTotals(uint64 slot) external view returns (uint64 importWh, uint64 exportWh) {
        SlotTotal memory total = _slotTotals[slot % READING_HISTORY_SLOTS];
        if (!total.set || total.slot < slot) return (0, 0);
        if (total.slot > slot) revert DeviceRegistrySlotTotalsEvicted(slot, total.slot);
        return (total.importWh, total.exportWh);
    }

    /// @inheritdoc IDeviceRegistry
    function metersOf(address owner) external view returns (address[] memory) {
        return _meters[owner];
    }

    /// @inheritdoc IDeviceRegistry
    /// @dev Metering reconciliation calls this once per slot for every account, so the meters
    /// of an owner are kept in a list at registration rather than searched for.
    function netMeteredWh(address[] calldata owners, uint64 slot) external view returns (int256[] memory net) {
        net = new int256[](owners.length);
        for (uint256 i; i < owners.length; ++i) {
            address[] storage meters = _meters[owners[i]];
            int256 sum;
            for (uint256 m; m < meters.length; ++m) {
                sum += _reading(meters[m], slot);
            }
            net[i] = sum;
        }
    }

    /// @inheritdoc IDeviceRegistry
    function readingsFinal(uint64 slot) public view returns (bool) {
        return block.timestamp >= readingsFinalAt(slot);
    }

    /// @inheritdoc IDeviceRegistry
    function readingsFinalAt(uint64 slot) public view returns (uint64) {
        return slotStart(slot + 1) + readingWindow;
    }

    /// @inheritdoc IDeviceRegistry
    function maxReadingWh(uint32 capacityW) public pure returns (uint64) {
        return uint64(capacityW) * SLOT_SECONDS / 3600;
    }

    /// @inheritdoc IDeviceRegistry
    /// @dev The EIP-712 domain binds chain id and this contract's address: a signature made for
    /// another chain or another registry recovers to a different key and is refused.
    function readingDigest(Reading calldata reading) public view returns (bytes32) {
        return _hashTypedDataV4(
            keccak256(
                abi.encode(
                    READING_TYPEHASH, reading.device, reading.slot, reading.energyWh, reading.nonce
                )
            )
        );
    }

    /// @dev The reading of `device` for `slot`, 0 when it has none; reverts once evicted. An
    /// entry holding a later slot means this slot's reading, if any, was overwritten (readings
    /// only move forward); one holding an earlier slot means the device sent none for it.
    function _reading(address device, uint64 slot) private view returns (int64) {
        Recorded memory r = _readings[device][slot % READING_HISTORY_SLOTS];
        if (!r.recorded || r.slot < slot) return 0;
        if (r.slot > slot) revert DeviceRegistryReadingEvicted(device, slot, r.slot);
        return r.energyWh;
    }

    function _existing(address device) private view returns (Device storage d) {
        d = _devices[device];
        if (d.owner == address(0)) revert DeviceRegistryUnknownDevice(device);
    }

    /// @dev The one access check for owner-or-registrar actions.
    function _ownedOrRegistrar(address device) private view returns (Device storage d) {
        d = _existing(device);
        if (msg.sender != d.owner && !hasRole(REGISTRAR_ROLE, msg.sender)) {
            revert DeviceRegistryNotOwnerOrRegistrar(device, msg.sender);
        }
    }
}
