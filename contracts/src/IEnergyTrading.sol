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

    /// @notice The outcome of a cleared slot.
    struct SlotResult {
        bool cleared;
        uint64 price;
        uint64 volumeWh;
        uint32 orderCount;
    }

    /// @notice The pricing formula's parameters, all in fixed point.
    /// @dev gridPrice = baseRate * (demandFactorBps + gridStressFactorBps) * tod[hour] / 1e8, in
    /// token base units per Wh; order limits must lie in [gridPrice * bandLowBps / 1e4,
    /// gridPrice * bandHighBps / 1e4].
    struct PriceParams {
        uint64 baseRate;
        uint32 demandFactorBps;
        uint32 gridStressFactorBps;
        uint32 bandLowBps;
        uint32 bandHighBps;
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
    /// @notice The price parameters are inconsistent (band low > high, or zero base rate).
    error EnergyTradingInvalidPriceParams();

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
    /// @notice The trading fee changed.
    event FeeChanged(uint16 feeBps, address treasury);
    /// @notice The gate closure lead time changed.
    event GateClosureChanged(uint64 gateClosureSeconds);
    /// @notice The pricing formula changed.
    event PriceParamsChanged(PriceParams params, uint16[24] todMultiplierBps);

    /// @notice Move `amount` payment tokens from the caller into the ledger.
    function deposit(uint256 amount) external;

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

    /// @notice Pause trading (deposits, orders, clearing); withdrawals continue.
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

    /// @notice Reference grid price of `slot` from the pricing formula.
    function gridPrice(uint64 slot) external view returns (uint64);

    /// @notice Allowed limit-price band of `slot`.
    function priceBand(uint64 slot) external view returns (uint64 low, uint64 high);

    /// @notice Timestamp at which the gate of `slot` closes.
    function gateClosesAt(uint64 slot) external view returns (uint64);
}
