// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title IGridBalance
/// @notice Load monitoring from meter readings, demand-response events, and the emergency mode.
interface IGridBalance {
    /// @notice Curtailable loads can be switched off; shiftable loads move in time.
    enum LoadType {
        Curtailable,
        Shiftable
    }

    /// @notice One participant of a demand-response event; the baseline (Wh per slot) is fixed
    /// when the event is created, before it starts.
    struct Participant {
        address device;
        LoadType loadType;
        uint8 priority;
        uint64 baselineWh;
    }

    /// @notice A demand-response event.
    struct DrEvent {
        uint64 startSlot;
        uint8 durationSlots;
        bool cancelled;
        bool settled;
        uint64 targetReductionWh;
        uint128 incentivePerWh;
        uint128 peakBonus;
        uint128 participationReward;
    }

    /// @notice Metered load of a slot.
    struct SlotLoad {
        bool recorded;
        bool overLimit;
        uint64 importWh;
        uint64 exportWh;
    }

    /// @notice A zero address was given.
    error GridBalanceZeroAddress();
    /// @notice Readings of `slot` are not final yet.
    error GridBalanceReadingsNotFinal(uint64 slot);
    /// @notice `slot` was already recorded.
    error GridBalanceSlotAlreadyRecorded(uint64 slot);
    /// @notice The event must start after the current slot (baselines fixed beforehand).
    error GridBalanceEventNotInFuture(uint64 startSlot, uint64 currentSlot);
    /// @notice Duration must be within [1, max].
    error GridBalanceInvalidDuration(uint8 durationSlots, uint8 max);
    /// @notice Participant count must be within [1, max].
    error GridBalanceInvalidParticipants(uint256 count, uint256 max);
    /// @notice Participants must be listed in non-decreasing priority (the curtailment order).
    error GridBalanceUnsortedPriorities(uint256 index);
    /// @notice Participant `device` is not an active registered meter.
    error GridBalanceNotActiveMeter(address device);
    /// @notice No event has id `eventId`.
    error GridBalanceUnknownEvent(uint256 eventId);
    /// @notice Event `eventId` has started; it can no longer be cancelled.
    error GridBalanceEventStarted(uint256 eventId);
    /// @notice Event `eventId` is cancelled or already settled.
    error GridBalanceEventClosed(uint256 eventId);
    /// @notice Recovery is allowed from `allowedAt` on.
    error GridBalanceRecoveryTooEarly(uint64 allowedAt);

    /// @notice Metered load of `slot` was recorded.
    event LoadRecorded(uint64 indexed slot, uint64 importWh, uint64 exportWh);
    /// @notice Net transformer flow in `slot` exceeded the limit.
    event LimitExceeded(uint64 indexed slot, uint64 netWh, uint64 limitWh);
    /// @notice A demand-response event was announced.
    event DemandResponseCreated(
        uint256 indexed eventId,
        uint64 startSlot,
        uint8 durationSlots,
        uint64 targetReductionWh,
        uint128 incentivePerWh,
        uint256 participants
    );
    /// @notice A demand-response event was called off.
    event DemandResponseCancelled(uint256 indexed eventId);
    /// @notice A participant's outcome in a settled event.
    event ParticipantSettled(
        uint256 indexed eventId, address indexed device, uint64 reductionWh, uint256 reward
    );
    /// @notice A demand-response event was settled.
    event DemandResponseSettled(uint256 indexed eventId, uint64 totalReductionWh, bool targetMet);
    /// @notice Emergency mode began: trading and new events are stopped.
    event EmergencyDeclared(bytes32 reason, address indexed by);
    /// @notice Emergency mode ended.
    event Recovered(address indexed by);
    /// @notice The transformer limit changed.
    event LimitChanged(uint64 transformerLimitWh);

    /// @notice Record the metered load of `slot` once its readings are final (anyone).
    function recordSlotLoad(uint64 slot) external;

    /// @notice Announce a demand-response event (operator role).
    function createEvent(
        uint64 startSlot,
        uint8 durationSlots,
        uint64 targetReductionWh,
        uint128 incentivePerWh,
        uint128 peakBonus,
        uint128 participationReward,
        Participant[] calldata participants
    ) external returns (uint256 eventId);

    /// @notice Call off an event that has not started (operator role).
    function cancelEvent(uint256 eventId) external;

    /// @notice Settle an event after its readings are final and grant its rewards (anyone).
    function settleEvent(uint256 eventId) external;

    /// @notice Enter emergency mode (emergency role).
    function declareEmergency(bytes32 reason) external;

    /// @notice Leave emergency mode after the minimum emergency duration (emergency role).
    function recover() external;

    /// @notice Set the transformer limit, in Wh of net flow per slot (operator role).
    function setTransformerLimit(uint64 transformerLimitWh) external;

    /// @notice Event `eventId`.
    function getEvent(uint256 eventId) external view returns (DrEvent memory);

    /// @notice Participants of `eventId` in curtailment order.
    function participants(uint256 eventId) external view returns (Participant[] memory);

    /// @notice Recorded load of `slot`.
    function slotLoad(uint64 slot) external view returns (SlotLoad memory);
}
