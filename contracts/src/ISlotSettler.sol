// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {IDeviceRegistry} from "./IDeviceRegistry.sol";
import {IEnergyTrading} from "./IEnergyTrading.sol";
import {IGridBalance} from "./IGridBalance.sol";
import {IRewardSystem} from "./IRewardSystem.sol";

/// @title ISlotSettler
/// @notice The market operator's one transaction per slot: end an emergency, reconcile an earlier
/// slot and grant its rewards, declare an emergency, post the price parameters, settle a slot's
/// signed batch, relay the meters' signed readings, and settle and announce demand-response
/// events, in that order, through the suite's own entry points (every check of theirs holds).
interface ISlotSettler {
    /// @notice A signed-batch settlement (the arguments of `IEnergyTrading.settleSignedBatch`).
    struct Settlement {
        uint64 slot;
        uint64 price;
        IEnergyTrading.SignedOrder[] orders;
        IEnergyTrading.Signature[] signatures;
        uint64[] fills;
    }

    /// @notice A reward `RewardSystem.grantReward` pays (demand-response incentives).
    struct Grant {
        address account;
        uint256 amount;
        IRewardSystem.RewardKind kind;
    }

    /// @notice A whole reconciliation of `slot` in one part (`IEnergyTrading.reconcileSlot` with
    /// `rest` zero), then the renewable rewards of `exporters` (devices) and the `grants`.
    struct Reconciliation {
        uint64 slot;
        IEnergyTrading.Trade[] trades;
        address[] accounts;
        address[] exporters;
        Grant[] grants;
    }

    /// @notice GridBalance's demand response in one part: settle the events `settle` (in that
    /// order, each `settleEvent`), then, when `participants` is not empty, announce one event
    /// (`createEvent` with these arguments). An empty `participants` announces nothing.
    struct DemandResponse {
        uint256[] settle;
        uint64 startSlot;
        uint8 durationSlots;
        uint64 targetReductionWh;
        uint128 incentivePerWh;
        uint128 peakBonus;
        uint128 participationReward;
        IGridBalance.Participant[] participants;
    }

    /// @notice What one call does: the parts whose bits are set in `parts`, in the order
    /// recover, reconcile, emergency, price, settle, readings, demand response.
    struct SlotStep {
        uint8 parts;
        Reconciliation reconciliation;
        IEnergyTrading.PriceParams params;
        uint16[24] todMultiplierBps;
        Settlement settlement;
        IDeviceRegistry.Reading[] readings;
        bytes[] readingSignatures;
        DemandResponse demandResponse;
    }

    /// @notice A zero address was given where one is required.
    error SlotSettlerZeroAddress();
    /// @notice `parts` selects nothing or names a part that does not exist.
    error SlotSettlerInvalidParts(uint8 parts);

    /// @notice One `run` did the `parts` given; `settledSlot` and `reconciledSlot` are as passed
    /// (meaningful only where the part's bit is set).
    event SlotStepRun(uint8 parts, uint64 settledSlot, uint64 reconciledSlot);

    /// @notice Do `step`'s parts in one transaction (operator role); any part's revert reverts
    /// the whole step with that contract's own custom error.
    function run(SlotStep calldata step) external;

    /// @notice The contracts the settler drives: (EnergyTrading, DeviceRegistry, RewardSystem).
    function suite() external view returns (IEnergyTrading trading, IDeviceRegistry registry, IRewardSystem rewards);

    /// @notice The GridBalance whose emergencies the settler declares and ends and whose
    /// demand-response events it settles and announces.
    function gridBalance() external view returns (IGridBalance);
}
