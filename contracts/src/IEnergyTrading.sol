// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

/// @title IEnergyTrading
/// @notice Peer-to-peer energy market: limit orders per 15-minute slot, uniform-price batch
/// clearing computed off-chain and verified on-chain, settlement into an internal token ledger.
interface IEnergyTrading {
    /// @notice Buy = the order takes energy and pays; Sell = the order delivers energy and is paid.
    enum Side {
        Buy,
        Sell
    }

    /// @notice A limit order for `energyWh` in each of `durationSlots` slots from `startSlot`.
    struct Order {
        address owner;
        uint64 energyWh;
        uint8 durationSlots;
        Side side;
        bool cancelled;
        uint64 limitPrice;
        uint64 startSlot;
    }

    /// @notice The outcome of a cleared slot. `signedBatch`: settled by `settleSignedBatch`, so
    /// sellers' proceeds wait in escrow for reconciliation; `reconciled`: metering settled;
    /// `feeBps`: the fee the settlement charged (reconciliation pays held proceeds net of it).
    struct SlotResult {
        bool cleared;
        uint64 price;
        uint64 volumeWh;
        uint32 orderCount;
        bool signedBatch;
        bool reconciled;
        uint16 feeBps;
    }

    /// @notice An order signed off-chain (EIP-712) by `owner` for one `slot`, submitted in a batch
    /// by the solver. `nonce` (0-255) tells the owner's orders in a slot apart and is the bit
    /// `cancelSignedOrders` sets to withdraw it.
    struct SignedOrder {
        address owner;
        uint64 slot;
        Side side;
        uint64 energyWh;
        uint64 limitPrice;
        uint8 nonce;
    }

    /// @notice A compact (EIP-2098) secp256k1 signature.
    struct Signature {
        bytes32 r;
        bytes32 vs;
    }

    /// @notice One line of a slot's committed trade list, as reconciliation replays it.
    /// `account` indexes the reconciliation's account list (ignored for zero fills).
    struct Trade {
        address owner;
        Side side;
        uint64 fillWh;
        uint32 account;
    }

    /// @notice The pricing formula's parameters, all in fixed point.
    /// @dev gridPrice = baseRate * (demandFactorBps + gridStressFactorBps) * tod[hour] / 1e8, in
    /// token base units per Wh; order limits must lie in [gridPrice * bandLowBps / 1e4,
    /// gridPrice * bandHighBps / 1e4].
    /// `imbalancePenaltyBps` worsens the grid price for metering imbalances: a shortfall pays
    /// gridPrice * (1e4 + penalty) / 1e4 per Wh, a surplus earns gridPrice * (1e4 - penalty) / 1e4.
    struct PriceParams {
        uint64 baseRate;
        uint32 demandFactorBps;
        uint32 gridStressFactorBps;
        uint32 bandLowBps;
        uint32 bandHighBps;
        uint32 imbalancePenaltyBps;
    }

    /// @notice A zero amount, quantity or duration was given.
    error EnergyTradingZeroAmount();
    /// @notice A zero address was given where one is required.
    error EnergyTradingZeroAddress();
    /// @notice `durationSlots` is outside [1, max].
    error EnergyTradingInvalidDuration(uint8 durationSlots, uint8 max);
    /// @notice `limitPrice` lies outside the slot's band [low, high].
    error EnergyTradingPriceOutOfBand(uint64 limitPrice, uint64 low, uint64 high);
    /// @notice The gate of `slot` closed at `closedAt`: no order changes any more.
    error EnergyTradingGateClosed(uint64 slot, uint64 closedAt);
    /// @notice The gate of `slot` is still open until `closesAt`: it cannot be cleared yet.
    error EnergyTradingGateOpen(uint64 slot, uint64 closesAt);
    /// @notice `slot` already holds the maximum number of orders.
    error EnergyTradingSlotFull(uint64 slot, uint256 max);
    /// @notice The caller's free credit `available` is below `needed`.
    error EnergyTradingInsufficientCredit(uint256 needed, uint256 available);
    /// @notice No order has id `orderId`.
    error EnergyTradingUnknownOrder(uint256 orderId);
    /// @notice The caller does not own order `orderId`.
    error EnergyTradingNotOrderOwner(uint256 orderId, address caller);
    /// @notice Order `orderId` is already cancelled.
    error EnergyTradingOrderCancelled(uint256 orderId);
    /// @notice `slot` was already cleared.
    error EnergyTradingSlotAlreadyCleared(uint64 slot);
    /// @notice The clearing lists `got` fills but the slot has `expected` orders.
    error EnergyTradingFillCountMismatch(uint256 expected, uint256 got);
    /// @notice `price` lies outside the range of the slot's limit prices [low, high].
    error EnergyTradingPriceOutOfRange(uint64 price, uint64 low, uint64 high);
    /// @notice `price` is not a uniform clearing price: at it, demand and supply do not cross.
    /// @dev Valid iff demand(>= p) >= supply(< p) and supply(<= p) >= demand(> p).
    error EnergyTradingNotClearingPrice(uint64 price);
    /// @notice Fill `index` (order `orderId`) is `got` but the market rules give `expected`.
    error EnergyTradingWrongFill(uint256 index, uint256 orderId, uint64 expected, uint64 got);
    /// @notice The fee exceeds the maximum.
    error EnergyTradingFeeTooHigh(uint16 feeBps, uint16 max);
    /// @notice The price parameters are inconsistent (band low > high, zero base rate, or an
    /// imbalance penalty above 100 %).
    error EnergyTradingInvalidPriceParams();
    /// @notice `depositFor` got `accounts` accounts but `amounts` amounts.
    error EnergyTradingDepositLengthMismatch(uint256 accounts, uint256 amounts);
    /// @notice A signed batch holds `count` orders; at most `max` fit one transaction.
    error EnergyTradingBatchTooLarge(uint256 count, uint256 max);
    /// @notice The batch's arrays differ in length.
    error EnergyTradingBatchLengthMismatch(uint256 orders, uint256 signatures, uint256 fills);
    /// @notice `slot` holds `count` on-chain orders: it must be cleared by `clearSlot`.
    error EnergyTradingSlotHasBookOrders(uint64 slot, uint256 count);
    /// @notice Signed order `index` is for `orderSlot`, not for the slot being settled.
    error EnergyTradingOrderSlotMismatch(uint256 index, uint64 orderSlot, uint64 slot);
    /// @notice Signed order `index` does not follow its predecessor in (owner, nonce) order;
    /// strict order is what makes every signed order appear at most once.
    error EnergyTradingBatchNotSorted(uint256 index);
    /// @notice The signature of order `index` recovers to `recovered`, not to its `owner`.
    error EnergyTradingInvalidSignature(uint256 index, address owner, address recovered);
    /// @notice `owner` cancelled its signed order `nonce` for `slot`.
    error EnergyTradingSignedOrderCancelled(uint256 index, address owner, uint8 nonce);
    /// @notice Order `index`'s owner has `available` free credit, below the `needed` escrow (a
    /// buy: energy x limit) or collateral (a sell: energy x the shortfall price).
    error EnergyTradingBatchInsufficientCredit(uint256 index, address owner, uint256 needed, uint256 available);
    /// @notice `slot` has not been cleared yet, so there is nothing to reconcile.
    error EnergyTradingSlotNotCleared(uint64 slot);
    /// @notice `slot` was already reconciled against its meter readings.
    error EnergyTradingSlotAlreadyReconciled(uint64 slot);
    /// @notice The meter readings of `slot` may still change until `finalAt`.
    error EnergyTradingReadingsNotFinal(uint64 slot, uint64 finalAt);
    /// @notice The trade list given for `slot` is not the one its settlement committed to.
    error EnergyTradingTradesMismatch(uint64 slot);
    /// @notice Trade `index` points at an account entry that is not its owner.
    error EnergyTradingTradeAccountMismatch(uint256 index, address owner);
    /// @notice Reconciliation accounts must be strictly increasing; entry `index` is not.
    error EnergyTradingAccountsNotSorted(uint256 index);
    /// @notice The treasury's `available` credit cannot pay the `needed` imbalance surplus.
    error EnergyTradingTreasuryShort(uint256 needed, uint256 available);

    /// @notice Tokens entered the ledger.
    event Deposited(address indexed account, uint256 amount);
    /// @notice Tokens left the ledger.
    event Withdrawn(address indexed account, uint256 amount);
    /// @notice An order was placed; buy orders lock `escrow` from the owner's credit.
    event OrderCreated(
        uint256 indexed orderId,
        address indexed owner,
        Side side,
        uint64 startSlot,
        uint8 durationSlots,
        uint64 energyWh,
        uint64 limitPrice,
        uint256 escrow
    );
    /// @notice An order was cancelled and `refund` went back to the owner's credit.
    event OrderCancelled(uint256 indexed orderId, uint256 refund);
    /// @notice Order `orderId` traded `fillWh` in `slot` for `amount` (paid by a buyer, received
    /// net of fee by a seller).
    event OrderFilled(
        uint64 indexed slot, uint256 indexed orderId, address indexed owner, uint64 fillWh, uint256 amount
    );
    /// @notice `slot` was cleared at one `price` for `volumeWh`, with `fee` to the treasury.
    event SlotCleared(uint64 indexed slot, uint64 price, uint64 volumeWh, uint32 orderCount, uint256 fee);
    /// @notice `owner` cancelled the signed orders of `slot` whose nonce bits are in `mask`.
    event SignedOrdersCancelled(address indexed owner, uint64 indexed slot, uint256 mask);
    /// @notice `slot` was settled from a batch of signed orders: `batchHash` is the trade
    /// commitment (each fill is also in the calldata); sellers' `held` proceeds wait for metering.
    event SignedBatchSettled(
        uint64 indexed slot, uint64 price, uint64 volumeWh, uint32 orderCount, uint256 fee, uint256 held, bytes32 batchHash
    );
    /// @notice Metering settled `account`'s slot: `imbalanceWh` = metered net consumption minus
    /// net energy bought (positive: short, charged; negative: long, paid); `credited` is the
    /// net change of its credit, `unpaid` the charge its funds could not cover.
    event AccountReconciled(
        uint64 indexed slot, address indexed account, int256 imbalanceWh, int256 credited, uint256 unpaid
    );
    /// @notice A part of `slot`'s reconciliation settled `accounts` accounts: the treasury collected
    /// `charged` and paid `paid`; `complete` once the slot's whole trade list is reconciled.
    event SlotReconciled(
        uint64 indexed slot, uint32 accounts, uint256 charged, uint256 paid, uint256 unpaid, bool complete
    );
    /// @notice The trading fee changed.
    event FeeChanged(uint16 feeBps, address treasury);
    /// @notice The gate closure lead time changed.
    event GateClosureChanged(uint64 gateClosureSeconds);
    /// @notice The pricing formula changed.
    event PriceParamsChanged(PriceParams params, uint16[24] todMultiplierBps);

    /// @notice Move `amount` payment tokens from the caller into the ledger.
    function deposit(uint256 amount) external;

    /// @notice Move `amounts[i]` payment tokens from the caller into `accounts[i]`'s credit (an
    /// operator funding prosumers whose keys only sign orders and never pay gas).
    function depositFor(address[] calldata accounts, uint256[] calldata amounts) external;

    /// @notice Pull `amount` of the caller's free credit out of the ledger (works while paused).
    function withdraw(uint256 amount) external;

    /// @notice Place a limit order for `energyWh` in each slot of `[startSlot, startSlot + durationSlots)`.
    function createOrder(uint64 startSlot, uint64 energyWh, uint64 limitPrice, uint8 durationSlots, Side side)
        external
        returns (uint256 orderId);

    /// @notice Cancel an order before the gate of its first slot closes.
    function cancelOrder(uint256 orderId) external;

    /// @notice Submit the clearing of `slot` (solver role); reverts unless it is the market's
    /// clearing at `price` with `fills` in the slot's order-list order.
    function clearSlot(uint64 slot, uint64 price, uint64[] calldata fills) external;

    /// @notice Settle `slot` from signed orders in one transaction (solver role): verify each
    /// signature, nonce, band and escrow, verify the uniform-price clearing (`price`, `fills`)
    /// under the same rules as `clearSlot`, and move the money. Orders must be sorted by
    /// (owner, nonce) strictly; the slot must have no on-chain orders.
    function settleSignedBatch(
        uint64 slot,
        uint64 price,
        SignedOrder[] calldata orders,
        Signature[] calldata signatures,
        uint64[] calldata fills
    ) external;

    /// @notice Withdraw the caller's signed orders for `slot` whose nonce bits are set in `mask`,
    /// before the slot's gate closes.
    function cancelSignedOrders(uint64 slot, uint256 mask) external;

    /// @notice Settle the difference between traded and metered energy of `slot` (solver role),
    /// once its meter readings are final, in one or more parts. `trades` continues the slot's
    /// committed trade list (settlement order) where the previous part stopped; `rest` is the
    /// commitment hash of the trades after this part (zero when it is the last). `accounts`
    /// (strictly increasing, past every earlier part's) must hold every filled trade's owner
    /// and may add other metered members.
    function reconcileSlot(uint64 slot, Trade[] calldata trades, address[] calldata accounts, bytes32 rest)
        external;

    /// @notice Pause trading (deposits, orders, clearing trades); withdrawals continue, and so do
    /// the meters: an empty signed batch still closes a slot and slots still reconcile.
    function pause() external;

    /// @notice Resume trading.
    function unpause() external;

    /// @notice Set the trading fee (basis points of seller proceeds) and its treasury.
    function setFee(uint16 feeBps, address treasury) external;

    /// @notice Set the lead time before a slot's start at which its gate closes.
    function setGateClosure(uint64 gateClosureSeconds) external;

    /// @notice Set the pricing formula.
    function setPriceParams(PriceParams calldata params, uint16[24] calldata todMultiplierBps) external;

    /// @notice Free credit of `account`.
    function creditOf(address account) external view returns (uint256);

    /// @notice Sum of all free credit and of all escrow; with the token balance they close the books.
    function totals() external view returns (uint256 credits, uint256 escrow);

    /// @notice Order `orderId`.
    function getOrder(uint256 orderId) external view returns (Order memory);

    /// @notice Ids of the orders taking part in `slot`, in the order the clearing lists fills.
    function slotOrders(uint64 slot) external view returns (uint256[] memory);

    /// @notice Result of `slot`.
    function slotResult(uint64 slot) external view returns (SlotResult memory);

    /// @notice Commitment to `slot`'s trades (owner, side, fill) in settlement order: h_i =
    /// keccak256(owner << 96 | side << 64 | fill, h_{i+1}), h_n = 0; this returns h_0, and zero
    /// once the slot is reconciled (the commitment is deleted then; the settlement's event keeps it).
    function tradeCommitment(uint64 slot) external view returns (bytes32);

    /// @notice Bitmap of `owner`'s cancelled signed-order nonces for `slot`.
    function cancelledNonces(address owner, uint64 slot) external view returns (uint256);

    /// @notice EIP-712 digest an owner signs for `order`.
    function signedOrderDigest(SignedOrder calldata order) external view returns (bytes32);

    /// @notice Reference grid price of `slot` from the pricing formula.
    function gridPrice(uint64 slot) external view returns (uint64);

    /// @notice Allowed limit-price band of `slot`.
    function priceBand(uint64 slot) external view returns (uint64 low, uint64 high);

    /// @notice Timestamp at which the gate of `slot` closes.
    function gateClosesAt(uint64 slot) external view returns (uint64);
}
