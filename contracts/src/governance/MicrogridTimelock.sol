// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {TimelockController} from "@openzeppelin/contracts/governance/TimelockController.sol";

/// @title MicrogridTimelock
/// @notice OpenZeppelin's TimelockController, named so it gets its own artifact: it holds the
/// PARAMETER_ROLE of EnergyTrading and RewardSystem, so fee and reward changes wait out a delay
/// that gives every participant time to react (and to withdraw) before they apply.
contract MicrogridTimelock is TimelockController {
    /// @param minDelay Seconds between queueing and executing an operation.
    /// @param proposers Accounts that may queue (the governor).
    /// @param executors Accounts that may execute; the zero address lets anyone execute.
    /// @param admin Optional bootstrap admin; pass the zero address for a self-governed timelock.
    constructor(uint256 minDelay, address[] memory proposers, address[] memory executors, address admin)
        TimelockController(minDelay, proposers, executors, admin)
    {}
}
