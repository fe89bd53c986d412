// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";
import {IDeviceRegistry, READING_HISTORY_SLOTS} from "./IDeviceRegistry.sol";
import {IRewardSystem} from "./IRewardSystem.sol";

/// @title RewardSystem
/// @notice Pays rewards only out of what was funded: every grant is taken from the unallocated
/// budget, so claims can never exceed funding. Staking uses a reward-per-token accumulator, so a
/// distribution costs the same whatever the number of stakers.
contract RewardSystem is IRewardSystem, AccessControl, ReentrancyGuard {
    using SafeERC20 for IERC20;

    /// @notice Grants rewards and distributes staking rewards (GridBalance, the operator).
    bytes32 public constant REWARDER_ROLE = keccak256("REWARDER_ROLE");
    /// @notice Sets reward parameters (governance).
    bytes32 public constant PARAMETER_ROLE = keccak256("PARAMETER_ROLE");

    uint256 private constant ACC_PRECISION = 1e18;

    IERC20 private immutable _token;
    IDeviceRegistry private immutable _registry;

    uint256 private _totalFunded;
    uint256 private _unallocated;
    uint256 private _totalClaimed;
    uint256 private _renewableRatePerWh;
    mapping(address account => uint256) private _granted;

    uint256 private _totalStaked;
    uint256 private _rewardPerToken;
    mapping(address account => uint256) private _staked;
    mapping(address account => uint256) private _paidPerToken;
    mapping(address account => uint256) private _stakingEarned;
    /// @dev Per exporting device, a ring like the registry's readings: entry s % READING_HISTORY_SLOTS
    /// holds s + 1 once slot s's renewable reward was paid (0: none), so it stops growing after
    /// READING_HISTORY_SLOTS slots. A slot whose entry a later reward took over cannot be paid
    /// again: that later reward needed the device's reading of the later slot, which took the
    /// registry entry of this one, and the registry refuses an evicted reading.
    mapping(address device => uint64[READING_HISTORY_SLOTS]) private _renewableRewarded;

    /// @param admin Receives DEFAULT_ADMIN_ROLE and PARAMETER_ROLE.
    /// @param token_ The reward token.
    /// @param registry The device registry whose readings back renewable rewards.
    /// @param renewableRatePerWh Reward per exported Wh.
    constructor(address admin, IERC20 token_, IDeviceRegistry registry, uint256 renewableRatePerWh) {
        _token = token_;
        _registry = registry;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(PARAMETER_ROLE, admin);
        _renewableRatePerWh = renewableRatePerWh;
        emit RenewableRateChanged(renewableRatePerWh);
    }

    /// @inheritdoc IRewardSystem
    function fund(uint256 amount) external nonReentrant {
        if (amount == 0) revert RewardSystemZeroAmount();
        _totalFunded += amount;
        _unallocated += amount;
        emit Funded(msg.sender, amount);
        _token.safeTransferFrom(msg.sender, address(this), amount);
    }

    /// @inheritdoc IRewardSystem
    function grantReward(address account, uint256 amount, RewardKind kind) external onlyRole(REWARDER_ROLE) {
        _grant(account, amount, kind);
    }

    /// @inheritdoc IRewardSystem
    /// @dev Anyone may call it: the amount follows from signed readings and the governed rate.
    function rewardRenewable(uint64 slot, address[] calldata devices) external {
        if (!_registry.readingsFinal(slot)) revert RewardSystemReadingsNotFinal(slot);
        uint256 rate = _renewableRatePerWh;
        uint64 entry = slot % READING_HISTORY_SLOTS;
        for (uint256 i; i < devices.length; ++i) {
            address device = devices[i];
            if (_renewableRewarded[device][entry] == slot + 1) revert RewardSystemAlreadyRewarded(device, slot);
            (int64 energyWh, bool recorded) = _registry.readingOf(device, slot);
            if (!recorded || energyWh >= 0) revert RewardSystemNoExport(device, slot);
            _renewableRewarded[device][entry] = slot + 1;
            uint256 amount = uint256(uint64(-energyWh)) * rate;
            _grant(_registry.getDevice(device).owner, amount, RewardKind.Renewable);
        }
    }

    /// @inheritdoc IRewardSystem
    function claim() external nonReentrant returns (uint256 amount) {
        _accrue(msg.sender);
        amount = _granted[msg.sender] + _stakingEarned[msg.sender];
        if (amount == 0) revert RewardSystemNothingToClaim(msg.sender);
        _granted[msg.sender] = 0;
        _stakingEarned[msg.sender] = 0;
        _totalClaimed += amount;
        emit RewardClaimed(msg.sender, amount);
        _token.safeTransfer(msg.sender, amount);
    }

    /// @inheritdoc IRewardSystem
    function stake(uint256 amount) external nonReentrant {
        if (amount == 0) revert RewardSystemZeroAmount();
        _accrue(msg.sender);
        _staked[msg.sender] += amount;
        _totalStaked += amount;
        emit Staked(msg.sender, amount);
        _token.safeTransferFrom(msg.sender, address(this), amount);
    }

    /// @inheritdoc IRewardSystem
    function unstake(uint256 amount) external nonReentrant {
        if (amount == 0) revert RewardSystemZeroAmount();
        uint256 staked = _staked[msg.sender];
        if (amount > staked) revert RewardSystemInsufficientStake(amount, staked);
        _accrue(msg.sender);
        _staked[msg.sender] = staked - amount;
        _totalStaked -= amount;
        emit Unstaked(msg.sender, amount);
        _token.safeTransfer(msg.sender, amount);
    }

    /// @inheritdoc IRewardSystem
    /// @dev The whole `amount` leaves the budget even though stakers' shares round down: debiting
    /// only the rounded share would let per-staker rounding over the accumulated rate exceed
    /// what was debited (found by the stateful tests). The dust stays in the contract, unowned.
    function distributeStakingReward(uint256 amount) external onlyRole(REWARDER_ROLE) {
        if (amount == 0) revert RewardSystemZeroAmount();
        if (_totalStaked == 0) revert RewardSystemNothingStaked();
        if (amount > _unallocated) revert RewardSystemInsufficientFunding(amount, _unallocated);
        _unallocated -= amount;
        _rewardPerToken += amount * ACC_PRECISION / _totalStaked;
        emit StakingRewardDistributed(amount, _rewardPerToken);
    }

    /// @inheritdoc IRewardSystem
    function setRenewableRate(uint256 ratePerWh) external onlyRole(PARAMETER_ROLE) {
        _renewableRatePerWh = ratePerWh;
        emit RenewableRateChanged(ratePerWh);
    }

    /// @inheritdoc IRewardSystem
    function claimable(address account) external view returns (uint256) {
        return _granted[account] + _stakingEarned[account] + _pendingStaking(account);
    }

    /// @inheritdoc IRewardSystem
    function unallocated() external view returns (uint256) {
        return _unallocated;
    }

    /// @notice Funded, claimed and staked totals (for audits and invariant tests).
    function totals() external view returns (uint256 funded, uint256 claimed, uint256 staked) {
        return (_totalFunded, _totalClaimed, _totalStaked);
    }

    /// @notice Tokens `account` has staked.
    function stakedOf(address account) external view returns (uint256) {
        return _staked[account];
    }

    /// @notice Accumulated staking reward per staked token, scaled by 1e18.
    function rewardPerToken() external view returns (uint256) {
        return _rewardPerToken;
    }

    /// @notice Reward per exported Wh.
    function renewableRate() external view returns (uint256) {
        return _renewableRatePerWh;
    }

    /// @notice The reward token.
    function token() external view returns (IERC20) {
        return _token;
    }

    function _grant(address account, uint256 amount, RewardKind kind) private {
        if (amount == 0) revert RewardSystemZeroAmount();
        if (amount > _unallocated) revert RewardSystemInsufficientFunding(amount, _unallocated);
        _unallocated -= amount;
        _granted[account] += amount;
        emit RewardGranted(account, kind, amount);
    }

    function _accrue(address account) private {
        _stakingEarned[account] += _pendingStaking(account);
        _paidPerToken[account] = _rewardPerToken;
    }

    function _pendingStaking(address account) private view returns (uint256) {
        return _staked[account] * (_rewardPerToken - _paidPerToken[account]) / ACC_PRECISION;
    }
}
