// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {IDeviceRegistry} from "./IDeviceRegistry.sol";
import {IEnergyTrading} from "./IEnergyTrading.sol";
import {IGridBalance} from "./IGridBalance.sol";
import {IRewardSystem} from "./IRewardSystem.sol";
import {ISlotSettler} from "./ISlotSettler.sol";

/// @title SlotSettler
/// @notice The market operator's single entry point for a slot's routine: one transaction instead
/// of four or five, so a simulated or live slot pays one transaction's overhead (base gas, nonce,
/// block, receipt) and one round trip. It adds no rule of its own and bypasses none: it calls
/// EnergyTrading, DeviceRegistry and RewardSystem exactly as the operator would, holding the
/// roles the operator would hold (SOLVER_ROLE and PARAMETER_ROLE on EnergyTrading, REWARDER_ROLE
/// on RewardSystem, EMERGENCY_ROLE and OPERATOR_ROLE on GridBalance), and only OPERATOR_ROLE may
/// call it.
/// @dev A slot's readings must be submitted inside its reading window and it may be reconciled
/// only once that window has closed, so one block can never do both for the same slot: the
/// operator reconciles slot s - 1 in the transaction that settles slot s. The reconciliation runs
/// first, under the price parameters slot s - 1 was settled with, and so before the next slot's
/// orders are checked against credit, exactly the order of operations of separate transactions.
/// An emergency (grid stress beyond the emergency threshold) is declared after that
/// reconciliation and before the settlement, so the slot it covers trades nothing (its batch must
/// be empty) while its meters are still settled; it is ended first thing in the first slot
/// without stress, before anything of that slot runs.
/// Demand response runs last, so it sees the pause the step leaves: GridBalance refuses to settle
/// or announce an event during an emergency, so the operator leaves the part out of a step that
/// declares or continues one. An event must start after the block's slot (its baselines fixed
/// before it begins) and settles once the readings of its last slot are final.
contract SlotSettler is ISlotSettler, AccessControl {
    /// @notice Calls `run`.
    bytes32 public constant OPERATOR_ROLE = keccak256("OPERATOR_ROLE");
    /// @notice `parts` bit: reconcile `step.reconciliation.slot` and grant its rewards.
    uint8 public constant PART_RECONCILE = 1;
    /// @notice `parts` bit: post `step.params` and `step.todMultiplierBps`.
    uint8 public constant PART_PRICE = 2;
    /// @notice `parts` bit: settle `step.settlement`.
    uint8 public constant PART_SETTLE = 4;
    /// @notice `parts` bit: relay `step.readings`.
    uint8 public constant PART_READINGS = 8;
    /// @notice `parts` bit: end the emergency (`GridBalance.recover`) before anything else.
    uint8 public constant PART_RECOVER = 16;
    /// @notice `parts` bit: declare an emergency (`GridBalance.declareEmergency`) after the
    /// reconciliation, so no trade of this step's settlement can happen.
    uint8 public constant PART_EMERGENCY = 32;
    /// @notice `parts` bit: settle `step.demandResponse.settle`, then announce the event it
    /// describes when its participant list is not empty, after every other part.
    uint8 public constant PART_DEMAND_RESPONSE = 64;
    uint8 private constant ALL_PARTS = 127;
    /// @notice The reason `PART_EMERGENCY` gives GridBalance.
    bytes32 public constant EMERGENCY_REASON = "grid stress";

    IEnergyTrading private immutable _trading;
    IDeviceRegistry private immutable _registry;
    IRewardSystem private immutable _rewards;
    IGridBalance private immutable _grid;

    /// @param admin Receives DEFAULT_ADMIN_ROLE.
    /// @param operator Receives OPERATOR_ROLE.
    /// @param trading_ The EnergyTrading that settles and reconciles.
    /// @param registry_ The DeviceRegistry the readings go to.
    /// @param rewards_ The RewardSystem that grants rewards.
    /// @param grid_ The GridBalance whose emergencies it declares and ends and whose
    /// demand-response events it settles and announces.
    constructor(
        address admin,
        address operator,
        IEnergyTrading trading_,
        IDeviceRegistry registry_,
        IRewardSystem rewards_,
        IGridBalance grid_
    ) {
        if (
            admin == address(0) || operator == address(0) || address(trading_) == address(0)
                || address(registry_) == address(0) || address(rewards_) == address(0)
                || address(grid_) == address(0)
        ) revert SlotSettlerZeroAddress();
        _trading = trading_;
        _registry = registry_;
        _rewards = rewards_;
        _grid = grid_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(OPERATOR_ROLE, operator);
    }

    /// @inheritdoc ISlotSettler
    function run(SlotStep calldata step) external onlyRole(OPERATOR_ROLE) {
        uint8 parts = step.parts;
        if (parts == 0 || parts > ALL_PARTS) revert SlotSettlerInvalidParts(parts);
        if (parts & PART_RECOVER != 0) _grid.recover();
        if (parts & PART_RECONCILE != 0) _reconcile(step.reconciliation);
        if (parts & PART_EMERGENCY != 0) _grid.declareEmergency(EMERGENCY_REASON);
        if (parts & PART_PRICE != 0) _trading.setPriceParams(step.params, step.todMultiplierBps);
        if (parts & PART_SETTLE != 0) _settle(step.settlement);
        if (parts & PART_READINGS != 0) _registry.submitReadings(step.readings, step.readingSignatures);
        if (parts & PART_DEMAND_RESPONSE != 0) _demandResponse(step.demandResponse);
        emit SlotStepRun(parts, step.settlement.slot, step.reconciliation.slot);
    }

    /// @inheritdoc ISlotSettler
    function suite() external view returns (IEnergyTrading trading, IDeviceRegistry registry, IRewardSystem rewards) {
        return (_trading, _registry, _rewards);
    }

    /// @inheritdoc ISlotSettler
    function gridBalance() external view returns (IGridBalance) {
        return _grid;
    }

    function _reconcile(Reconciliation calldata r) private {
        _trading.reconcileSlot(r.slot, r.trades, r.accounts, bytes32(0));
        if (r.exporters.length != 0) _rewards.rewardRenewable(r.slot, r.exporters);
        for (uint256 i; i < r.grants.length; ++i) {
            Grant calldata g = r.grants[i];
            _rewards.grantReward(g.account, g.amount, g.kind);
        }
    }

    function _demandResponse(DemandResponse calldata d) private {
        for (uint256 i; i < d.settle.length; ++i) {
            _grid.settleEvent(d.settle[i]);
        }
        if (d.participants.length != 0) {
            _grid.createEvent(
                d.startSlot,
                d.durationSlots,
                d.targetReductionWh,
                d.incentivePerWh,
                d.peakBonus,
                d.participationReward,
                d.participants
            );
        }
    }

    function _settle(Settlement calldata s) private {
        _trading.settleSignedBatch(s.slot, s.price, s.orders, s.signatures, s.fills);
    }
}
