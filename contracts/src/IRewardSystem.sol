// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title IRewardSystem
/// @notice Funded rewards in the community's ERC20Votes token, and staking of that token.
interface IRewardSystem {
    /// @notice Why a reward was granted.
    enum RewardKind {
        EnergySaving,
        PeakReduction,
        DemandResponse,
        Renewable
    }

    /// @notice A zero amount was given.
    error RewardSystemZeroAmount();
    /// @notice Granting `requested` exceeds the funded, unallocated budget `available`.
    error RewardSystemInsufficientFunding(uint256 requested, uint256 available);
    /// @notice The caller has nothing to claim.
    error RewardSystemNothingToClaim(address account);
    /// @notice Unstaking `requested` exceeds the caller's stake `staked`.
    error RewardSystemInsufficientStake(uint256 requested, uint256 staked);
    /// @notice A staking reward cannot be distributed while nothing is staked.
    error RewardSystemNothingStaked();
    /// @notice The renewable reward of `device` for `slot` was already granted.
    error RewardSystemAlreadyRewarded(address device, uint64 slot);
    /// @notice The readings of `slot` are not final yet.
    error RewardSystemReadingsNotFinal(uint64 slot);
    /// @notice `device` reported no export in `slot`.
    error RewardSystemNoExport(address device, uint64 slot);
    /// @notice The arrays' lengths differ.
    error RewardSystemLengthMismatch();

    /// @notice `amount` tokens were added to the budget by `funder`.
    event Funded(address indexed funder, uint256 amount);
    /// @notice `amount` was earmarked for `account`.
    event RewardGranted(address indexed account, RewardKind indexed kind, uint256 amount);
    /// @notice `account` claimed `amount` (grants plus staking rewards).
    event RewardClaimed(address indexed account, uint256 amount);
    /// @notice `account` staked `amount`.
    event Staked(address indexed account, uint256 amount);
    /// @notice `account` unstaked `amount`.
    event Unstaked(address indexed account, uint256 amount);
    /// @notice `amount` was shared among all stakers.
    event StakingRewardDistributed(uint256 amount, uint256 rewardPerToken);
    /// @notice The renewable reward rate changed.
    event RenewableRateChanged(uint256 ratePerWh);

    /// @notice Add `amount` reward tokens from the caller to the budget.
    function fund(uint256 amount) external;

    /// @notice Earmark `amount` of the budget for `account` (rewarder role).
    function grantReward(address account, uint256 amount, RewardKind kind) external;

    /// @notice Grant the renewable-generation reward for the metered export of `devices` in `slot`,
    /// once per device and slot; a slot whose reading the registry has evicted
    /// (`DeviceRegistryReadingEvicted`) can no longer be rewarded.
    function rewardRenewable(uint64 slot, address[] calldata devices) external;

    /// @notice Pay the caller's granted and staking rewards.
    function claim() external returns (uint256 amount);

    /// @notice Stake `amount` reward tokens.
    function stake(uint256 amount) external;

    /// @notice Unstake `amount` reward tokens.
    function unstake(uint256 amount) external;

    /// @notice Share `amount` of the budget among stakers pro rata to stake (rewarder role).
    function distributeStakingReward(uint256 amount) external;

    /// @notice Set the renewable reward per exported Wh (parameter role: governance).
    function setRenewableRate(uint256 ratePerWh) external;

    /// @notice Granted rewards plus staking rewards `account` can claim now.
    function claimable(address account) external view returns (uint256);

    /// @notice Funded tokens not yet earmarked for anyone.
    function unallocated() external view returns (uint256);
}
