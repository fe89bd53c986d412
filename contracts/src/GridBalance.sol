// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {Pausable} from "@openzeppelin/contracts/utils/Pausable.sol";
import {IDeviceRegistry} from "./IDeviceRegistry.sol";
import {IEnergyTrading} from "./IEnergyTrading.sol";
import {IGridBalance} from "./IGridBalance.sol";
import {IRewardSystem} from "./IRewardSystem.sol";
import {SlotClock} from "./SlotClock.sol";

/// @title GridBalance
/// @notice Keeps the feeder inside its limits: records each slot's metered load, runs
/// demand-response events whose rewards follow from signed readings against baselines fixed in
/// advance, and switches the market into emergency mode (withdrawals keep working).
contract GridBalance is IGridBalance, SlotClock, AccessControl, Pausable {
    /// @notice Announces and cancels demand-response events, sets limits.
    bytes32 public constant OPERATOR_ROLE = keccak256("OPERATOR_ROLE");
    /// @notice Declares and ends emergencies.
    bytes32 public constant EMERGENCY_ROLE = keccak256("EMERGENCY_ROLE");

    /// @notice Longest event, in slots (four hours).
    uint8 public constant MAX_EVENT_SLOTS = 16;
    /// @notice Most participants per event, so settlement fits one transaction.
    uint256 public constant MAX_PARTICIPANTS = 100;

    IDeviceRegistry private immutable _registry;
    IEnergyTrading private immutable _trading;
    IRewardSystem private immutable _rewards;
    /// @notice Shortest emergency, in seconds, before recovery is allowed.
    uint64 public immutable minEmergencySeconds;

    uint64 private _transformerLimitWh;
    uint64 private _emergencySince;
    uint256 private _nextEventId = 1;
    mapping(uint256 eventId => DrEvent) private _events;
    mapping(uint256 eventId => Participant[]) private _participants;
    mapping(uint64 slot => SlotLoad) private _loads;

    /// @param admin Receives DEFAULT_ADMIN_ROLE, OPERATOR_ROLE and EMERGENCY_ROLE.
    /// @param registry Source of readings.
    /// @param trading The market this contract pauses in an emergency (needs its PAUSER_ROLE).
    /// @param rewards Where event rewards are granted (needs its REWARDER_ROLE).
    /// @param genesis_ Start of slot 0.
    /// @param transformerLimitWh Net flow per slot above which a slot is over the limit.
    /// @param minEmergencySeconds_ Shortest emergency before recovery.
    constructor(
        address admin,
        IDeviceRegistry registry,
        IEnergyTrading trading,
        IRewardSystem rewards,
        uint64 genesis_,
        uint64 transformerLimitWh,
        uint64 minEmergencySeconds_
    ) SlotClock(genesis_) {
        if (
            admin == address(0) || address(registry) == address(0) || address(trading) == address(0)
                || address(rewards) == address(0)
        ) revert GridBalanceZeroAddress();
        _registry = registry;
        _trading = trading;
        _rewards = rewards;
        minEmergencySeconds = minEmergencySeconds_;
        _transformerLimitWh = transformerLimitWh;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(OPERATOR_ROLE, admin);
        _grantRole(EMERGENCY_ROLE, admin);
        emit LimitChanged(transformerLimitWh);
    }

    /// @inheritdoc IGridBalance
    function recordSlotLoad(uint64 slot) external {
        if (!_registry.readingsFinal(slot)) revert GridBalanceReadingsNotFinal(slot);
        SlotLoad storage load = _loads[slot];
        if (load.recorded) revert GridBalanceSlotAlreadyRecorded(slot);
        (uint64 importWh, uint64 exportWh) = _registry.slotTotals(slot);
        uint64 net = importWh > exportWh ? importWh - exportWh : exportWh - importWh;
        bool over = net > _transformerLimitWh;
        _loads[slot] = SlotLoad({recorded: true, overLimit: over, importWh: importWh, exportWh: exportWh});
        emit LoadRecorded(slot, importWh, exportWh);
        if (over) emit LimitExceeded(slot, net, _transformerLimitWh);
    }

    /// @inheritdoc IGridBalance
    function createEvent(
        uint64 startSlot,
        uint8 durationSlots,
        uint64 targetReductionWh,
        uint128 incentivePerWh,
        uint128 peakBonus,
        uint128 participationReward,
        Participant[] calldata list
    ) external onlyRole(OPERATOR_ROLE) whenNotPaused returns (uint256 eventId) {
        uint64 nowSlot = currentSlot();
        if (startSlot <= nowSlot) revert GridBalanceEventNotInFuture(startSlot, nowSlot);
        if (durationSlots == 0 || durationSlots > MAX_EVENT_SLOTS) {
            revert GridBalanceInvalidDuration(durationSlots, MAX_EVENT_SLOTS);
        }
        if (list.length == 0 || list.length > MAX_PARTICIPANTS) {
            revert GridBalanceInvalidParticipants(list.length, MAX_PARTICIPANTS);
        }
        eventId = _nextEventId++;
        _events[eventId] = DrEvent({
            startSlot: startSlot,
            durationSlots: durationSlots,
            cancelled: false,
            settled: false,
            targetReductionWh: targetReductionWh,
            incentivePerWh: incentivePerWh,
            peakBonus: peakBonus,
            participationReward: participationReward
        });
        Participant[] storage stored = _participants[eventId];
        for (uint256 i; i < list.length; ++i) {
            if (i > 0 && list[i].priority < list[i - 1].priority) revert GridBalanceUnsortedPriorities(i);
            IDeviceRegistry.Device memory d = _registry.getDevice(list[i].device);
            if (!d.active || d.deviceType != IDeviceRegistry.DeviceType.Meter) {
                revert GridBalanceNotActiveMeter(list[i].device);
            }
            stored.push(list[i]);
        }
        emit DemandResponseCreated(
            eventId, startSlot, durationSlots, targetReductionWh, incentivePerWh, list.length
        );
    }

    /// @inheritdoc IGridBalance
    function cancelEvent(uint256 eventId) external onlyRole(OPERATOR_ROLE) {
        DrEvent storage ev = _open(eventId);
        if (currentSlot() >= ev.startSlot) revert GridBalanceEventStarted(eventId);
        ev.cancelled = true;
        emit DemandResponseCancelled(eventId);
    }

    /// @inheritdoc IGridBalance
    /// @dev Reduction per participant = baseline x duration - metered import over the window,
    /// counted only if every slot of the window was metered (a silent meter earns nothing).
    function settleEvent(uint256 eventId) external whenNotPaused {
        DrEvent storage ev = _open(eventId);
        uint64 lastSlot = ev.startSlot + ev.durationSlots - 1;
        if (!_registry.readingsFinal(lastSlot)) revert GridBalanceReadingsNotFinal(lastSlot);
        ev.settled = true;

        Participant[] storage list = _participants[eventId];
        uint256 n = list.length;
        uint64[] memory reductions = new uint64[](n);
        uint64 total;
        for (uint256 i; i < n; ++i) {
            reductions[i] = _reduction(list[i], ev.startSlot, ev.durationSlots);
            total += reductions[i];
        }
        bool targetMet = total >= ev.targetReductionWh;
        for (uint256 i; i < n; ++i) {
            uint256 reward = _payParticipant(ev, list[i].device, reductions[i], targetMet);
            emit ParticipantSettled(eventId, list[i].device, reductions[i], reward);
        }
        emit DemandResponseSettled(eventId, total, targetMet);
    }

    /// @inheritdoc IGridBalance
    function declareEmergency(bytes32 reason) external onlyRole(EMERGENCY_ROLE) {
        _pause();
        _emergencySince = uint64(block.timestamp);
        if (!Pausable(address(_trading)).paused()) _trading.pause();
        emit EmergencyDeclared(reason, msg.sender);
    }

    /// @inheritdoc IGridBalance
    function recover() external onlyRole(EMERGENCY_ROLE) whenPaused {
        uint64 allowedAt = _emergencySince + minEmergencySeconds;
        if (block.timestamp < allowedAt) revert GridBalanceRecoveryTooEarly(allowedAt);
        _unpause();
        if (Pausable(address(_trading)).paused()) _trading.unpause();
        emit Recovered(msg.sender);
    }

    /// @inheritdoc IGridBalance
    function setTransformerLimit(uint64 transformerLimitWh) external onlyRole(OPERATOR_ROLE) {
        _transformerLimitWh = transformerLimitWh;
        emit LimitChanged(transformerLimitWh);
    }

    /// @inheritdoc IGridBalance
    function getEvent(uint256 eventId) external view returns (DrEvent memory) {
        return _events[eventId];
    }

    /// @inheritdoc IGridBalance
    function participants(uint256 eventId) external view returns (Participant[] memory) {
        return _participants[eventId];
    }

    /// @inheritdoc IGridBalance
    function slotLoad(uint64 slot) external view returns (SlotLoad memory) {
        return _loads[slot];
    }

    /// @notice Net-flow limit per slot, in Wh.
    function transformerLimit() external view returns (uint64) {
        return _transformerLimitWh;
    }

    function _open(uint256 eventId) private view returns (DrEvent storage ev) {
        ev = _events[eventId];
        if (ev.durationSlots == 0) revert GridBalanceUnknownEvent(eventId);
        if (ev.cancelled || ev.settled) revert GridBalanceEventClosed(eventId);
    }

    function _reduction(Participant storage p, uint64 startSlot, uint8 duration) private view returns (uint64) {
        int256 metered;
        for (uint64 s = startSlot; s < startSlot + duration; ++s) {
            (int64 energyWh, bool recorded) = _registry.readingOf(p.device, s);
            if (!recorded) return 0;
            metered += energyWh;
        }
        int256 baseline = int256(uint256(p.baselineWh)) * int256(uint256(duration));
        return metered < baseline ? uint64(uint256(baseline - metered)) : 0;
    }

    function _payParticipant(DrEvent storage ev, address device, uint64 reduction, bool targetMet)
        private
        returns (uint256 reward)
    {
        if (reduction == 0) return 0;
        address owner = _registry.getDevice(device).owner;
        uint256 saving = uint256(reduction) * ev.incentivePerWh;
        if (saving != 0) _rewards.grantReward(owner, saving, IRewardSystem.RewardKind.EnergySaving);
        if (ev.participationReward != 0) {
            _rewards.grantReward(owner, ev.participationReward, IRewardSystem.RewardKind.DemandResponse);
        }
        if (targetMet && ev.peakBonus != 0) {
            _rewards.grantReward(owner, ev.peakBonus, IRewardSystem.RewardKind.PeakReduction);
        }
        return saving + ev.participationReward + (targetMet ? ev.peakBonus : 0);
    }
}
