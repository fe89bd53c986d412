// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @dev How many slots of readings the registry keeps: a device's reading of slot s (and the
/// meters' totals of s) sits in entry s % READING_HISTORY_SLOTS until its reading of a later
/// slot with the same entry overwrites it. A reading is consumed within a few slots (reconciled
/// at the next slot, renewable reward with it, a demand-response event of at most 16 slots
/// settled once its last slot is final), so 32 slots (8 hours) leave room for an emergency that
/// holds settlements back, while the suite's storage stops growing after 32 slots instead of
/// growing by one storage slot per meter per slot for ever: a node that rebuilds its state root
/// from every storage slot at each block (anvil) pays for each one at every block.
uint64 constant READING_HISTORY_SLOTS = 32;

/// @title IDeviceRegistry
/// @notice Registered field devices and their EIP-712 signed meter readings.
interface IDeviceRegistry {
    /// @notice Kinds of device the registry knows. Only meters feed the per-slot load totals.
    enum DeviceType {
        Meter,
        Inverter,
        Battery,
        Appliance,
        Sensor
    }

    /// @notice A registered device, keyed by the address of its signing key. `nextNonce` is the
    /// lowest nonce its next reading may carry (its last used nonce + 1; 0 before any): it
    /// shares a storage slot with `lastSlot`, which every reading writes anyway.
    struct Device {
        address owner;
        DeviceType deviceType;
        bool active;
        uint32 capacityW;
        uint64 lastSlot;
        uint64 lastSeen;
        uint32 readings;
        uint32 missedSlots;
        uint64 nextNonce;
    }

    /// @notice One device to register (see `registerDevice`).
    struct Registration {
        address device;
        address owner;
        DeviceType deviceType;
        uint32 capacityW;
    }

    /// @notice One signed meter reading: net energy in `slot`, positive = imported/consumed,
    /// negative = exported/produced, in Wh.
    struct Reading {
        address device;
        uint64 slot;
        int64 energyWh;
        uint256 nonce;
    }

    /// @notice Signing key `device` is already registered.
    error DeviceRegistryAlreadyRegistered(address device);
    /// @notice No device is registered under `device`.
    error DeviceRegistryUnknownDevice(address device);
    /// @notice Device `device` is deactivated.
    error DeviceRegistryInactiveDevice(address device);
    /// @notice Device `device` is already active.
    error DeviceRegistryAlreadyActive(address device);
    /// @notice Rated capacity must be positive.
    error DeviceRegistryZeroCapacity();
    /// @notice Owner and signing key must be non-zero.
    error DeviceRegistryZeroAddress();
    /// @notice The signature does not recover to the reading's device key.
    error DeviceRegistryInvalidSignature(address device, address recovered);
    /// @notice |energyWh| exceeds rated capacity x slot length.
    error DeviceRegistryCapacityExceeded(address device, int64 energyWh, uint64 maxWh);
    /// @notice Slot `slot` has not ended yet at `currentSlot`.
    error DeviceRegistrySlotNotEnded(uint64 slot, uint64 currentSlot);
    /// @notice The reading window of `slot` closed at `closedAt`: its readings are final.
    error DeviceRegistryReadingTooLate(uint64 slot, uint64 closedAt);
    /// @notice Readings must move forward: `slot` is not after the device's last slot.
    error DeviceRegistrySlotNotAfterLast(address device, uint64 slot, uint64 lastSlot);
    /// @notice `nonce` is below `nextNonce`, the lowest the device may use now: it was used
    /// already (a replay) or skipped by a later reading of the device that landed first.
    error DeviceRegistryNonceTooLow(address device, uint256 nonce, uint64 nextNonce);
    /// @notice `nonce` leaves no nonce after it (the registry keeps nonces in 64 bits).
    error DeviceRegistryNonceTooHigh(address device, uint256 nonce);
    /// @notice Caller is neither the device owner nor a registrar.
    error DeviceRegistryNotOwnerOrRegistrar(address device, address caller);
    /// @notice A batch lists `readings` readings but `signatures` signatures.
    error DeviceRegistryLengthMismatch(uint256 readings, uint256 signatures);
    /// @notice The reading of `device` for `slot` was overwritten by one of slot `heldSlot`,
    /// READING_HISTORY_SLOTS or more slots later: the registry no longer knows it.
    error DeviceRegistryReadingEvicted(address device, uint64 slot, uint64 heldSlot);
    /// @notice The meters' totals of `slot` were overwritten by those of `heldSlot`.
    error DeviceRegistrySlotTotalsEvicted(uint64 slot, uint64 heldSlot);
    /// @notice `device` reported within the stale threshold; no alert raised.
    error DeviceRegistryNotStale(address device, uint64 lastSeen);

    /// @notice A device was registered.
    event DeviceRegistered(
        address indexed device, address indexed owner, DeviceType deviceType, uint32 capacityW
    );
    /// @notice A device was deactivated; its readings are refused from now on.
    event DeviceDeactivated(address indexed device, address indexed by);
    /// @notice A deactivated device was put back into service.
    event DeviceReactivated(address indexed device, address indexed by);
    /// @notice A signed reading was accepted.
    event ReadingRecorded(address indexed device, uint64 indexed slot, int64 energyWh, uint256 nonce);
    /// @notice A maintenance alert for `device` (`reason` is a short code, e.g. "stale").
    event MaintenanceAlert(address indexed device, bytes32 reason, address indexed raisedBy);

    /// @notice Register a device under its signing key.
    function registerDevice(address device, address owner, DeviceType deviceType, uint32 capacityW)
        external;

    /// @notice Register several devices in one transaction (registrar role).
    function registerDevices(Registration[] calldata registrations) external;

    /// @notice Stop accepting readings from `device`.
    function deactivateDevice(address device) external;

    /// @notice Accept readings from a deactivated `device` again.
    function reactivateDevice(address device) external;

    /// @notice Record an EIP-712 signed reading; anyone may relay it. Its nonce must be at least
    /// the device's `nonces` (gaps allowed: a reading that never reached the chain does not
    /// hold back the device's later ones) and its slot after the device's last.
    function submitReading(Reading calldata reading, bytes calldata signature) external;

    /// @notice Record several signed readings in one transaction (a slot's meters at once).
    function submitReadings(Reading[] calldata readings, bytes[] calldata signatures) external;

    /// @notice Raise a maintenance alert for `device` (maintenance role).
    function raiseAlert(address device, bytes32 reason) external;

    /// @notice Raise a "stale" alert for a device silent for more than the stale threshold.
    function flagStale(address device) external;

    /// @notice The lowest nonce the next reading of `device` may carry (its last used + 1).
    function nonces(address device) external view returns (uint256);

    /// @notice The device registered under `device`.
    function getDevice(address device) external view returns (Device memory);

    /// @notice Reading of `device` for `slot` (0 if none) and whether one was recorded; reverts
    /// with `DeviceRegistryReadingEvicted` once a later reading took its place (see
    /// READING_HISTORY_SLOTS), so nobody mistakes a forgotten reading for a missing one.
    function readingOf(address device, uint64 slot) external view returns (int64 energyWh, bool recorded);

    /// @notice Total metered import and export (Wh) of all meters in `slot`; reverts with
    /// `DeviceRegistrySlotTotalsEvicted` once a later slot's totals took their place.
    function slotTotals(uint64 slot) external view returns (uint64 importWh, uint64 exportWh);

    /// @notice Meters (active or not) registered to `owner`, in registration order.
    function metersOf(address owner) external view returns (address[] memory);

    /// @notice Net metered energy (Wh, + import / - export) of each owner's meters in `slot`;
    /// a meter without a reading counts zero, a meter whose reading was evicted reverts.
    function netMeteredWh(address[] calldata owners, uint64 slot) external view returns (int256[] memory);

    /// @notice Whether the reading window of `slot` has closed (its readings can no longer change).
    function readingsFinal(uint64 slot) external view returns (bool);

    /// @notice Timestamp from which the readings of `slot` are final.
    function readingsFinalAt(uint64 slot) external view returns (uint64);

    /// @notice Maximum |Wh| a device of `capacityW` may report for one slot.
    function maxReadingWh(uint32 capacityW) external pure returns (uint64);

    /// @notice EIP-712 digest a device signs for `reading`.
    function readingDigest(Reading calldata reading) external view returns (bytes32);
}
