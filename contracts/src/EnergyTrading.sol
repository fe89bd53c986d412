// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {Pausable} from "@openzeppelin/contracts/utils/Pausable.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";
import {IEnergyTrading} from "./IEnergyTrading.sol";
import {SlotClock} from "./SlotClock.sol";

/// @title EnergyTrading
/// @notice The microgrid's energy market. Orders rest per slot until the slot's gate closes; a
/// solver then submits the uniform-price clearing computed off-chain (contracts/clearing.py), and
/// this contract re-derives it in two linear passes over the slot's orders, so a wrong price or a
/// wrong fill reverts. Money moves only inside an internal ledger; tokens leave by withdrawal.
/// @dev Clearing rule at price p (D = demand, S = supply, ">= p" etc. over limit prices):
/// p is valid iff D(>=p) >= S(<p) and S(<=p) >= D(>p); volume V = min(D(>=p), S(<=p)).
/// Orders strictly in the money fill completely, orders out of the money not at all, and the
/// marginal orders (limit == p) of each side share what is left, R, pro rata by cumulative
/// rounding in list order: fill_i = floor(C_i * R / M) - floor(C_{i-1} * R / M), where C_i is the
/// running sum of marginal quantities and M their total. The fills sum to exactly R.
contract EnergyTrading is IEnergyTrading, SlotClock, AccessControl, Pausable, ReentrancyGuard {
    using SafeERC20 for IERC20;

    /// @notice Submits clearings.
    bytes32 public constant SOLVER_ROLE = keccak256("SOLVER_ROLE");
    /// @notice Pauses and resumes trading (GridBalance's emergency mode holds it).
    bytes32 public constant PAUSER_ROLE = keccak256("PAUSER_ROLE");
    /// @notice Sets fee, gate closure and pricing (governance).
    bytes32 public constant PARAMETER_ROLE = keccak256("PARAMETER_ROLE");

    /// @notice Most orders one slot takes: sized so that clearing it fits one transaction even
    /// when every order belongs to a different zero-credit account (measured on anvil: ~33.6 k
    /// gas per order, so 450 orders need ~15.2 M of the 16,777,216 EIP-7825 cap).
    uint256 public constant MAX_ORDERS_PER_SLOT = 450;
    /// @notice Longest order, in slots (two hours).
    uint8 public constant MAX_DURATION_SLOTS = 8;
    /// @notice Highest trading fee, in basis points.
    uint16 public constant MAX_FEE_BPS = 1000;

    IERC20 private immutable _token;
    address private _treasury;
    uint16 private _feeBps;
    uint64 private _gateClosure;
    PriceParams private _priceParams;
    uint16[24] private _todMultiplierBps;

    mapping(address account => uint256) private _credits;
    uint256 private _totalCredits;
    uint256 private _totalEscrow;

    uint256 private _nextOrderId = 1;
    mapping(uint256 orderId => Order) private _orders;
    mapping(uint64 slot => uint32[]) private _slotOrderIds;
    mapping(uint64 slot => SlotResult) private _results;

    /// @dev Demand and supply of one slot at the proposed price, from the first pass.
    struct Book {
        uint256 bidAt; // demand with limit >= p
        uint256 bidAbove; // demand with limit > p
        uint256 askAt; // supply with limit <= p
        uint256 askBelow; // supply with limit < p
        uint64 low; // lowest live limit price
        uint64 high; // highest live limit price
        uint256 live; // live (not cancelled) orders
    }

    /// @dev Running state of the second pass.
    struct Tally {
        uint256 bidRemainder; // R of the bid side
        uint256 bidMarginal; // M of the bid side
        uint256 bidCum; // C_i of the bid side
        uint256 askRemainder;
        uint256 askMarginal;
        uint256 askCum;
        uint256 fees;
        uint256 released; // escrow released by the slot (refunds + payments)
        uint64 volume;
        uint64 slot;
        uint64 price;
        uint16 feeBps;
    }

    /// @param admin Receives DEFAULT_ADMIN_ROLE and PARAMETER_ROLE.
    /// @param token_ The ERC20 payment token (plain: no fee on transfer, no rebasing).
    /// @param treasury Receives the trading fee.
    /// @param genesis_ Start of slot 0.
    /// @param gateClosureSeconds Lead time before a slot's start at which its gate closes.
    /// @param feeBps Trading fee in basis points of seller proceeds.
    /// @param params Pricing formula parameters.
    /// @param todMultiplierBps Hour-of-day multipliers (basis points).
    constructor(
        address admin,
        IERC20 token_,
        address treasury,
        uint64 genesis_,
        uint64 gateClosureSeconds,
        uint16 feeBps,
        PriceParams memory params,
        uint16[24] memory todMultiplierBps
    ) SlotClock(genesis_) {
        if (admin == address(0) || address(token_) == address(0)) revert EnergyTradingZeroAddress();
        _token = token_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(PARAMETER_ROLE, admin);
        _setFee(feeBps, treasury);
        _gateClosure = gateClosureSeconds;
        emit GateClosureChanged(gateClosureSeconds);
        _setPriceParams(params, todMultiplierBps);
    }

    // ------------------------------------------------------------------ ledger

    /// @inheritdoc IEnergyTrading
    function deposit(uint256 amount) external whenNotPaused nonReentrant {
        if (amount == 0) revert EnergyTradingZeroAmount();
        _credits[msg.sender] += amount;
        _totalCredits += amount;
        emit Deposited(msg.sender, amount);
        _token.safeTransferFrom(msg.sender, address(this), amount);
    }

    /// @inheritdoc IEnergyTrading
    /// @dev Deliberately not `whenNotPaused`: an emergency must never lock anyone's money.
    function withdraw(uint256 amount) external nonReentrant {
        if (amount == 0) revert EnergyTradingZeroAmount();
        uint256 available = _credits[msg.sender];
        if (amount > available) revert EnergyTradingInsufficientCredit(amount, available);
        _credits[msg.sender] = available - amount;
        _totalCredits -= amount;
        emit Withdrawn(msg.sender, amount);
        _token.safeTransfer(msg.sender, amount);
    }

    // ------------------------------------------------------------------ orders

    /// @inheritdoc IEnergyTrading
    function createOrder(uint64 startSlot, uint64 energyWh, uint64 limitPrice, uint8 durationSlots, Side side)
        external
        whenNotPaused
        returns (uint256 orderId)
    {
        if (energyWh == 0) revert EnergyTradingZeroAmount();
        if (durationSlots == 0 || durationSlots > MAX_DURATION_SLOTS) {
            revert EnergyTradingInvalidDuration(durationSlots, MAX_DURATION_SLOTS);
        }
        _requireGateOpen(startSlot);
        (uint64 low, uint64 high) = priceBand(startSlot);
        if (limitPrice < low || limitPrice > high || limitPrice == 0) {
            revert EnergyTradingPriceOutOfBand(limitPrice, low, high);
        }

        uint256 escrow;
        if (side == Side.Buy) {
            escrow = uint256(energyWh) * limitPrice * durationSlots;
            uint256 available = _credits[msg.sender];
            if (escrow > available) revert EnergyTradingInsufficientCredit(escrow, available);
            _credits[msg.sender] = available - escrow;
            _totalCredits -= escrow;
            _totalEscrow += escrow;
        }

        orderId = _nextOrderId++;
        _orders[orderId] = Order({
            owner: msg.sender,
            energyWh: energyWh,
            durationSlots: durationSlots,
            side: side,
            cancelled: false,
            limitPrice: limitPrice,
            startSlot: startSlot
        });
        for (uint64 s = startSlot; s < startSlot + durationSlots; ++s) {
            uint32[] storage ids = _slotOrderIds[s];
            if (ids.length >= MAX_ORDERS_PER_SLOT) revert EnergyTradingSlotFull(s, MAX_ORDERS_PER_SLOT);
            ids.push(uint32(orderId));
        }
        emit OrderCreated(orderId, msg.sender, side, startSlot, durationSlots, energyWh, limitPrice, escrow);
    }

    /// @inheritdoc IEnergyTrading
    /// @dev Allowed while paused: withdrawing an offer only reduces exposure.
    function cancelOrder(uint256 orderId) external nonReentrant {
        Order storage order = _orders[orderId];
        if (order.owner == address(0)) revert EnergyTradingUnknownOrder(orderId);
        if (order.owner != msg.sender) revert EnergyTradingNotOrderOwner(orderId, msg.sender);
        if (order.cancelled) revert EnergyTradingOrderCancelled(orderId);
        _requireGateOpen(order.startSlot);
        order.cancelled = true;
        uint256 refund;
        if (order.side == Side.Buy) {
            refund = uint256(order.energyWh) * order.limitPrice * order.durationSlots;
            _totalEscrow -= refund;
            _credits[msg.sender] += refund;
            _totalCredits += refund;
        }
        emit OrderCancelled(orderId, refund);
    }

    // ------------------------------------------------------------------ clearing

    /// @inheritdoc IEnergyTrading
    function clearSlot(uint64 slot, uint64 price, uint64[] calldata fills)
        external
        onlyRole(SOLVER_ROLE)
        whenNotPaused
        nonReentrant
    {
        uint64 closesAt = gateClosesAt(slot);
        if (block.timestamp < closesAt) revert EnergyTradingGateOpen(slot, closesAt);
        SlotResult storage result = _results[slot];
        if (result.cleared) revert EnergyTradingSlotAlreadyCleared(slot);
        uint32[] storage ids = _slotOrderIds[slot];
        uint256 n = ids.length;
        if (fills.length != n) revert EnergyTradingFillCountMismatch(n, fills.length);

        Book memory book = _scan(ids, price);
        if (book.live != 0) {
            if (price < book.low || price > book.high) {
                revert EnergyTradingPriceOutOfRange(price, book.low, book.high);
            }
            if (book.bidAt < book.askBelow || book.askAt < book.bidAbove) {
                revert EnergyTradingNotClearingPrice(price);
            }
        }
        uint256 volume = book.bidAt < book.askAt ? book.bidAt : book.askAt;
        Tally memory tally;
        tally.bidRemainder = volume - book.bidAbove;
        tally.bidMarginal = book.bidAt - book.bidAbove;
        tally.askRemainder = volume - book.askBelow;
        tally.askMarginal = book.askAt - book.askBelow;
        tally.volume = uint64(volume);
        tally.slot = slot;
        tally.price = price;
        tally.feeBps = _feeBps;
        for (uint256 i; i < n; ++i) {
            _settleOne(i, ids[i], fills[i], tally);
        }

        _totalEscrow -= tally.released;
        _totalCredits += tally.released;
        if (tally.fees != 0) _credits[_treasury] += tally.fees;
        result.cleared = true;
        result.price = price;
        result.volumeWh = tally.volume;
        result.orderCount = uint32(n);
        emit SlotCleared(slot, price, tally.volume, uint32(n), tally.fees);
    }

    /// @dev First pass: demand and supply at, above and below `price`.
    function _scan(uint32[] storage ids, uint64 price) private view returns (Book memory book) {
        book.low = type(uint64).max;
        uint256 n = ids.length;
        for (uint256 i; i < n; ++i) {
            Order storage order = _orders[ids[i]];
            if (order.cancelled) continue;
            uint64 limit = order.limitPrice;
            uint256 qty = order.energyWh;
            if (limit < book.low) book.low = limit;
            if (limit > book.high) book.high = limit;
            ++book.live;
            if (order.side == Side.Buy) {
                if (limit >= price) book.bidAt += qty;
                if (limit > price) book.bidAbove += qty;
            } else {
                if (limit <= price) book.askAt += qty;
                if (limit < price) book.askBelow += qty;
            }
        }
    }

    /// @dev Second pass, one order: check its fill against the rule and move its money. Released
    /// buyer escrow is either refunded to the buyer or paid (same price, same volume on both sides)
    /// to sellers and treasury, so the books stay closed without per-order total updates.
    function _settleOne(uint256 index, uint256 orderId, uint64 fill, Tally memory tally) private {
        Order storage order = _orders[orderId];
        uint64 expected = _expectedFill(order, tally);
        if (fill != expected) revert EnergyTradingWrongFill(index, orderId, expected, fill);
        if (order.cancelled) return;
        uint256 value = uint256(fill) * tally.price;
        if (order.side == Side.Buy) {
            uint256 escrow = uint256(order.energyWh) * order.limitPrice;
            tally.released += escrow;
            _credits[order.owner] += escrow - value;
            if (fill != 0) emit OrderFilled(tally.slot, orderId, order.owner, fill, value);
        } else if (fill != 0) {
            uint256 tradeFee = value * tally.feeBps / 10_000;
            tally.fees += tradeFee;
            _credits[order.owner] += value - tradeFee;
            emit OrderFilled(tally.slot, orderId, order.owner, fill, value - tradeFee);
        }
    }

    /// @dev The fill the market rule gives `order` at `tally.price`; advances the pro-rata cursor.
    function _expectedFill(Order storage order, Tally memory tally) private view returns (uint64) {
        if (order.cancelled) return 0;
        uint64 limit = order.limitPrice;
        uint64 qty = order.energyWh;
        uint64 price = tally.price;
        if (order.side == Side.Buy) {
            if (limit > price) return qty;
            if (limit < price) return 0;
            uint64 share = _proRata(qty, tally.bidRemainder, tally.bidMarginal, tally.bidCum);
            tally.bidCum += qty;
            return share;
        }
        if (limit < price) return qty;
        if (limit > price) return 0;
        uint64 askShare = _proRata(qty, tally.askRemainder, tally.askMarginal, tally.askCum);
        tally.askCum += qty;
        return askShare;
    }

    /// @dev Cumulative-rounding share of `remainder` for a marginal order of `qty` whose marginal
    /// predecessors on its side sum to `cumBefore`.
    function _proRata(uint64 qty, uint256 remainder, uint256 marginal, uint256 cumBefore)
        private
        pure
        returns (uint64)
    {
        return uint64((cumBefore + qty) * remainder / marginal - cumBefore * remainder / marginal);
    }

    // ------------------------------------------------------------------ admin

    /// @inheritdoc IEnergyTrading
    function pause() external onlyRole(PAUSER_ROLE) {
        _pause();
    }

    /// @inheritdoc IEnergyTrading
    function unpause() external onlyRole(PAUSER_ROLE) {
        _unpause();
    }

    /// @inheritdoc IEnergyTrading
    function setFee(uint16 feeBps, address treasury) external onlyRole(PARAMETER_ROLE) {
        _setFee(feeBps, treasury);
    }

    /// @inheritdoc IEnergyTrading
    function setGateClosure(uint64 gateClosureSeconds) external onlyRole(PARAMETER_ROLE) {
        _gateClosure = gateClosureSeconds;
        emit GateClosureChanged(gateClosureSeconds);
    }

    /// @inheritdoc IEnergyTrading
    function setPriceParams(PriceParams calldata params, uint16[24] calldata todMultiplierBps)
        external
        onlyRole(PARAMETER_ROLE)
    {
        _setPriceParams(params, todMultiplierBps);
    }

    // ------------------------------------------------------------------ views

    /// @inheritdoc IEnergyTrading
    function creditOf(address account) external view returns (uint256) {
        return _credits[account];
    }

    /// @inheritdoc IEnergyTrading
    function totals() external view returns (uint256 credits, uint256 escrow) {
        return (_totalCredits, _totalEscrow);
    }

    /// @inheritdoc IEnergyTrading
    function getOrder(uint256 orderId) external view returns (Order memory) {
        return _orders[orderId];
    }

    /// @inheritdoc IEnergyTrading
    function slotOrders(uint64 slot) external view returns (uint256[] memory ids) {
        uint32[] storage stored = _slotOrderIds[slot];
        ids = new uint256[](stored.length);
        for (uint256 i; i < ids.length; ++i) {
            ids[i] = stored[i];
        }
    }

    /// @inheritdoc IEnergyTrading
    function slotResult(uint64 slot) external view returns (SlotResult memory) {
        return _results[slot];
    }

    /// @notice The payment token.
    function token() external view returns (IERC20) {
        return _token;
    }

    /// @notice Fee (basis points) and treasury.
    function fee() external view returns (uint16 feeBps, address treasury) {
        return (_feeBps, _treasury);
    }

    /// @notice Gate closure lead time in seconds.
    function gateClosure() external view returns (uint64) {
        return _gateClosure;
    }

    /// @notice The pricing formula's parameters.
    function priceParams() external view returns (PriceParams memory, uint16[24] memory) {
        return (_priceParams, _todMultiplierBps);
    }

    /// @inheritdoc IEnergyTrading
    function gridPrice(uint64 slot) public view returns (uint64) {
        PriceParams memory p = _priceParams;
        uint256 hour = (slot % 96) / 4;
        return uint64(
            uint256(p.baseRate) * (uint256(p.demandFactorBps) + p.gridStressFactorBps)
                * _todMultiplierBps[hour] / 1e8
        );
    }

    /// @inheritdoc IEnergyTrading
    function priceBand(uint64 slot) public view returns (uint64 low, uint64 high) {
        uint256 ref = gridPrice(slot);
        low = uint64(ref * _priceParams.bandLowBps / 10_000);
        high = uint64(ref * _priceParams.bandHighBps / 10_000);
    }

    /// @inheritdoc IEnergyTrading
    function gateClosesAt(uint64 slot) public view returns (uint64) {
        uint64 start = slotStart(slot);
        return start > _gateClosure ? start - _gateClosure : 0;
    }

    // ------------------------------------------------------------------ internals

    function _requireGateOpen(uint64 slot) private view {
        uint64 closesAt = gateClosesAt(slot);
        if (block.timestamp >= closesAt) revert EnergyTradingGateClosed(slot, closesAt);
    }

    function _setFee(uint16 feeBps, address treasury) private {
        if (treasury == address(0)) revert EnergyTradingZeroAddress();
        if (feeBps > MAX_FEE_BPS) revert EnergyTradingFeeTooHigh(feeBps, MAX_FEE_BPS);
        _feeBps = feeBps;
        _treasury = treasury;
        emit FeeChanged(feeBps, treasury);
    }

    function _setPriceParams(PriceParams memory params, uint16[24] memory todMultiplierBps) private {
        if (params.baseRate == 0 || params.bandLowBps > params.bandHighBps) {
            revert EnergyTradingInvalidPriceParams();
        }
        _priceParams = params;
        _todMultiplierBps = todMultiplierBps;
        emit PriceParamsChanged(params, todMultiplierBps);
    }
}
