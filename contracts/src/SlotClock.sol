// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title SlotClock
/// @notice The market's 15-minute slot grid, shared by every contract of the suite so that a slot
/// number means the same interval of time everywhere.
/// @dev Slot `s` covers `[genesis + s * SLOT_SECONDS, genesis + (s + 1) * SLOT_SECONDS)`.
abstract contract SlotClock {
    /// @notice Length of one market slot in seconds (15 minutes, the metering interval).
    uint64 public constant SLOT_SECONDS = 900;

    uint64 private immutable _genesis;

    /// @dev Thrown when the clock would start in the future of the deploying block.
    error SlotClockGenesisInFuture(uint64 genesis, uint64 nowTimestamp);

    constructor(uint64 genesis_) {
        if (genesis_ > block.timestamp) {
            revert SlotClockGenesisInFuture(genesis_, uint64(block.timestamp));
        }
        _genesis = genesis_;
    }

    /// @notice Timestamp at which slot 0 starts.
    function genesis() public view returns (uint64) {
        return _genesis;
    }

    /// @notice The slot that contains the current block's timestamp.
    function currentSlot() public view returns (uint64) {
        return (uint64(block.timestamp) - _genesis) / SLOT_SECONDS;
    }

    /// @notice Start timestamp of `slot`.
    function slotStart(uint64 slot) public view returns (uint64) {
        return _genesis + slot * SLOT_SECONDS;
    }
}
