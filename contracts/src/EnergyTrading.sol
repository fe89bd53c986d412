// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {Pausable} from "@openzeppelin/contracts/utils/Pausable.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";
import {IDeviceRegistry} from "./IDeviceRegistry.sol";
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
/// Two ways in: on-chain orders (`createOrder`, escrow locked at once) cleared by `clearSlot`, or
/// EIP-712 signed orders settled in one `settleSignedBatch` transaction per slot. Either way the
/// settlement commits to its trade list, and `reconcileSlot` later settles each account's
/// difference between traded and metered energy (DeviceRegistry readings) at the grid price made
/// worse by the imbalance penalty.
contract EnergyTrading is IEnergyTrading, SlotClock, AccessControl, EIP712, Pausable, ReentrancyGuard {
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
    /// @notice Most signed orders one `settleSignedBatch` takes: sized so that the worst case
    /// (every order from a different account, every buyer's credit cold) fits the 16,777,216
    /// EIP-7825 cap with a margin (see docs/trading.md for the measurements).
    uint256 public constant MAX_SIGNED_BATCH = 1000;
    /// @notice Typehash of a signed order.
    bytes32 public constant SIGNED_ORDER_TYPEHASH = keccak256(
        "SignedOrder(address owner,uint64 slot,uint8 side,uint64 energyWh,uint64 limitPrice,uint8 nonce)"
    );

    IERC20 private immutable _token;
    IDeviceRegistry private immutable _registry;
    address private _treasury;
    uint16 private _feeBps;
    uint64 private _gateClosure;
    /// @dev `SEEN_*` bits: which per-slot records any slot has ever had. Packed with the
    /// treasury (read by every settlement and reconciliation), so testing a bit is a warm read,
    /// and a slot's record that was never written is not read at all: on a node such as anvil,
    /// which recomputes the state root over every storage slot a contract ever touched, a read
    /// of an empty mapping entry leaves one more slot to hash at every block. Set once, never
    /// cleared: a clear bit proves the record empty, a set one only sends the reader to it.
    uint8 private _seen;
    PriceParams private _priceParams;
    uint16[24] private _todMultiplierBps;

    mapping(address account => uint256) private _credits;
    uint256 private _totalCredits;
    uint256 private _totalEscrow;

    uint256 private _nextOrderId = 1;
    mapping(uint256 orderId => Order) private _orders;
    mapping(uint64 slot => uint32[]) private _slotOrderIds;
    mapping(uint64 slot => SlotResult) private _results;
    mapping(uint64 slot => bytes32) private _commitments;
    mapping(address owner => mapping(uint64 slot => uint256)) private _cancelledNonces;
    mapping(uint64 slot => uint256) private _cancellations;
    mapping(uint64 slot => ReconcileCursor) private _cursors;

    /// @dev `_seen`: some slot has had a book order (`_slotOrderIds`).
    uint8 private constant SEEN_BOOK_ORDERS = 1;
    /// @dev `_seen`: some owner has cancelled signed orders (`_cancellations`).
    uint8 private constant SEEN_CANCELLATIONS = 2;
    /// @dev `_seen`: some reconciliation has run in parts (`_cursors`).
    uint8 private constant SEEN_PARTS = 4;

    /// @dev Demand and supply of one slot at the proposed price, from the first pass.
    struct Book {
        uint256 bidAt; // demand with limit >= p
        uint256 bidAbove; // demand with limit > p
        uint256 askAt; // supply with limit <= p
        uint256 askBelow; // supply with limit < p
        uint64 low; // lowest live limit price
        uint64 high; // highest live limit price
        uint256 live; // live (not cancelled) orders
        uint64 price; // the proposed price
        bool anyCancelled; // signed batches: some owner cancelled a signed order for the slot
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
        uint256 paid; // signed batches: buyers' payments, moved from credit into escrow
        uint256[] words; // one (owner, side, fill) word per listed order, for the commitment
        uint64 volume;
        uint64 slot;
        uint64 price;
        uint16 feeBps;
    }

    /// @dev Where a slot's reconciliation stands: the commitment hash of the trades not yet
    /// reconciled, and the last account settled (the next part's accounts must exceed it).
    struct ReconcileCursor {
        bytes32 expected;
        address lastAccount;
        bool started;
    }

    /// @dev Running totals of one reconciliation.
    struct Reconciliation {
        uint256 shortPrice; // per Wh of shortfall
        uint256 longPrice; // per Wh of surplus
        uint256 charged; // collected from accounts
        uint256 paid; // surplus paid to accounts
        uint256 unpaid; // charges beyond accounts' funds
        uint256 held; // seller proceeds released from escrow
        uint64 slot;
    }

    /// @param admin Receives DEFAULT_ADMIN_ROLE and PARAMETER_ROLE.
    /// @param token_ The ERC20 payment token (plain: no fee on transfer, no rebasing).
    /// @param registry_ The DeviceRegistry whose meter readings reconcile the slots.
    /// @param treasury Receives the trading fee.
    /// @param genesis_ Start of slot 0.
    /// @param gateClosureSeconds Lead time before a slot's start at which its gate closes.
    /// @param feeBps Trading fee in basis points of seller proceeds.
    /// @param params Pricing formula parameters.
    /// @param todMultiplierBps Hour-of-day multipliers (basis points).
    constructor(
        address admin,
        IERC20 token_,
        IDeviceRegistry registry_,
        address treasury,
        uint64 genesis_,
        uint64 gateClosureSeconds,
        uint16 feeBps,
        PriceParams memory params,
        uint16[24] memory todMultiplierBps
    ) SlotClock(genesis_) EIP712("EnergyTrading", "1") {
        if (admin == address(0) || address(token_) == address(0) || address(registry_) == address(0)) {
            revert EnergyTradingZeroAddress();
        }
        _token = token_;
        _registry = registry_;
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
    /// @dev One token transfer for the whole list.
    function depositFor(address[] calldata accounts, uint256[] calldata amounts)
        external
        whenNotPaused
        nonReentrant
    {
        if (accounts.length != amounts.length) {
            revert EnergyTradingDepositLengthMismatch(accounts.length, amounts.length);
        }
        uint256 total;
        for (uint256 i; i < accounts.length; ++i) {
            address account = accounts[i];
            uint256 amount = amounts[i];
            if (account == address(0)) revert EnergyTradingZeroAddress();
            if (amount == 0) revert EnergyTradingZeroAmount();
            _credits[account] += amount;
            total += amount;
            emit Deposited(account, amount);
        }
        if (total == 0) revert EnergyTradingZeroAmount();
        _totalCredits += total;
        _token.safeTransferFrom(msg.sender, address(this), total);
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

        uint256 escrow = 0; // sell orders lock nothing
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
        _see(SEEN_BOOK_ORDERS);
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
        uint256 refund = 0; // a sell order locked nothing
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
        SlotResult storage result = _requireClearable(slot);
        uint32[] storage ids = _slotOrderIds[slot];
        uint256 n = ids.length;
        if (fills.length != n) revert EnergyTradingFillCountMismatch(n, fills.length);

        Tally memory tally = _tally(_scan(ids, price), slot, price);
        tally.words = new uint256[](n);
        for (uint256 i; i < n; ++i) {
            _settleOne(i, ids[i], fills[i], tally);
        }

        _totalEscrow -= tally.released;
        _totalCredits += tally.released;
        if (tally.fees != 0) _credits[_treasury] += tally.fees;
        _record(result, tally, n, false);
        emit SlotCleared(slot, price, tally.volume, uint32(n), tally.fees);
    }

    /// @inheritdoc IEnergyTrading
    /// @dev Replay safety without a storage write per order: an order is bound by its signature
    /// to one slot of this contract on this chain, a slot settles once, and strict (owner, nonce)
    /// order admits each order at most once per batch. Sellers' proceeds are not credited here
    /// but held in escrow until `reconcileSlot` has checked delivery against the meters, so a
    /// seller costs no storage write at settlement and a buyer one (its credit).
    function settleSignedBatch(
        uint64 slot,
        uint64 price,
        SignedOrder[] calldata orders,
        Signature[] calldata signatures,
        uint64[] calldata fills
    ) external onlyRole(SOLVER_ROLE) nonReentrant {
        // While paused only an empty batch settles: it closes the slot with no trade, so that
        // its metering can still be reconciled (an emergency stops trading, not the meters).
        if (orders.length != 0) _requireNotPaused();
        if (orders.length > MAX_SIGNED_BATCH) revert EnergyTradingBatchTooLarge(orders.length, MAX_SIGNED_BATCH);
        if (signatures.length != orders.length || fills.length != orders.length) {
            revert EnergyTradingBatchLengthMismatch(orders.length, signatures.length, fills.length);
        }
        if (_seen & SEEN_BOOK_ORDERS != 0 && _slotOrderIds[slot].length != 0) {
            revert EnergyTradingSlotHasBookOrders(slot, _slotOrderIds[slot].length);
        }
        SlotResult storage result = _requireClearable(slot);
        Book memory book = _scanSigned(slot, orders, signatures, price);
        Tally memory tally = _tally(book, slot, price);
        tally.words = new uint256[](orders.length);
        _settleAllSigned(orders, fills, tally);
        _closeSigned(result, tally);
    }

    /// @dev Book a settled signed batch: buyers' payments less fees wait in escrow as held
    /// seller proceeds, fees go to the treasury.
    function _closeSigned(SlotResult storage result, Tally memory tally) private {
        uint256 held = tally.paid - tally.fees;
        _totalCredits = _totalCredits - tally.paid + tally.fees;
        _totalEscrow += held;
        if (tally.fees != 0) _credits[_treasury] += tally.fees;
        uint256 n = tally.words.length;
        bytes32 commitment = _record(result, tally, n, true);
        emit SignedBatchSettled(tally.slot, tally.price, tally.volume, uint32(n), tally.fees, held, commitment);
    }

    /// @dev Second pass over a signed batch.
    function _settleAllSigned(SignedOrder[] calldata orders, uint64[] calldata fills, Tally memory tally) private {
        for (uint256 i; i < orders.length; ++i) {
            _settleSigned(i, orders[i], fills[i], tally);
        }
    }

    /// @inheritdoc IEnergyTrading
    /// @dev Allowed while paused, like `cancelOrder`; refused once the gate has closed so that
    /// nobody can pull an order out from under a settlement being prepared (property 4).
    function cancelSignedOrders(uint64 slot, uint256 mask) external {
        if (mask == 0) revert EnergyTradingZeroAmount();
        _requireGateOpen(slot);
        _cancelledNonces[msg.sender][slot] |= mask;
        ++_cancellations[slot];
        _see(SEEN_CANCELLATIONS);
        emit SignedOrdersCancelled(msg.sender, slot, mask);
    }

    // ------------------------------------------------------------------ metering

    /// @inheritdoc IEnergyTrading
    /// @dev O(trades + accounts). `trades` continues the slot's committed list where the last
    /// part stopped and `rest` is the commitment hash of what follows it (zero for the end), so
    /// the part is checked before any money moves. Each filled trade names its account's index
    /// (checked against the owner); accounts strictly increase within and across parts, so no
    /// account is settled twice. Imbalance = metered net consumption - net energy bought; a
    /// shortfall (> 0) pays gridPrice * (1e4 + penalty) / 1e4 per Wh to the treasury, a surplus
    /// (< 0) is paid gridPrice * (1e4 - penalty) / 1e4 by it. A charge beyond an account's funds
    /// (credit + held proceeds + surplus payment) stays unpaid.
    /// Deliberately not `whenNotPaused`: in an emergency trading stops but the meters go on, and
    /// what they metered is settled as in any other slot.
    function reconcileSlot(uint64 slot, Trade[] calldata trades, address[] calldata accounts, bytes32 rest)
        external
        onlyRole(SOLVER_ROLE)
        nonReentrant
    {
        SlotResult storage result = _results[slot];
        if (!result.cleared) revert EnergyTradingSlotNotCleared(slot);
        if (result.reconciled) revert EnergyTradingSlotAlreadyReconciled(slot);
        uint64 finalAt = _registry.readingsFinalAt(slot);
        if (block.timestamp < finalAt) revert EnergyTradingReadingsNotFinal(slot, finalAt);
        ReconcileCursor storage cursor = _cursors[slot];
        _checkPart(slot, cursor, trades, accounts, rest);

        int256[] memory imbalance = _registry.netMeteredWh(accounts, slot);
        uint256[] memory held = _replayTrades(result, trades, accounts, imbalance);
        Reconciliation memory r = _settleImbalances(slot, accounts, imbalance, held);

        uint256 treasuryCredit = _credits[_treasury];
        if (treasuryCredit + r.charged < r.paid) {
            revert EnergyTradingTreasuryShort(r.paid, treasuryCredit + r.charged);
        }
        _credits[_treasury] = treasuryCredit + r.charged - r.paid;
        _totalEscrow -= r.held;
        _totalCredits += r.held;
        bool complete = rest == bytes32(0);
        if (complete) result.reconciled = true;
        emit SlotReconciled(slot, uint32(accounts.length), r.charged, r.paid, r.unpaid, complete);
    }

    /// @dev A reconciliation part must hash, with `rest`, to what the slot still expects, and
    /// its accounts must increase past the previous part's; then the cursor moves on. The last
    /// part (`rest` zero) deletes the cursor and the trade commitment: `result.reconciled` is
    /// the guard from then on, and neither is read again, so a slot's reconciliation leaves no
    /// storage behind (a one-part reconciliation writes no cursor at all).
    function _checkPart(
        uint64 slot,
        ReconcileCursor storage cursor,
        Trade[] calldata trades,
        address[] calldata accounts,
        bytes32 rest
    ) private {
        bytes32 chain = rest;
        for (uint256 i = trades.length; i != 0; --i) {
            Trade calldata t = trades[i - 1];
            chain = _link(_word(t.owner, t.side, t.fillWh), chain);
        }
        bool started = _seen & SEEN_PARTS != 0 && cursor.started;
        if (chain != (started ? cursor.expected : _commitments[slot])) {
            revert EnergyTradingTradesMismatch(slot);
        }
        address last = started ? cursor.lastAccount : address(0);
        for (uint256 j; j < accounts.length; ++j) {
            if (accounts[j] <= last) revert EnergyTradingAccountsNotSorted(j);
            last = accounts[j];
        }
        if (rest == bytes32(0)) {
            if (started) delete _cursors[slot];
            if (_commitments[slot] != bytes32(0)) delete _commitments[slot];
            return;
        }
        cursor.expected = rest;
        cursor.lastAccount = last;
        cursor.started = true;
        _see(SEEN_PARTS);
    }

    /// @dev Record that some slot now has the record `bit` stands for (one write, the first time).
    function _see(uint8 bit) private {
        uint8 seen = _seen;
        if (seen & bit == 0) _seen = seen | bit;
    }

    /// @dev Replay a part of the committed trades: turn metered net consumption into imbalance
    /// and collect each account's held seller proceeds (signed batches only).
    function _replayTrades(
        SlotResult storage result,
        Trade[] calldata trades,
        address[] calldata accounts,
        int256[] memory imbalance
    ) private view returns (uint256[] memory held) {
        held = new uint256[](accounts.length);
        uint256 price = result.price;
        uint256 feeBps = result.feeBps;
        bool signed = result.signedBatch;
        for (uint256 i; i < trades.length; ++i) {
            Trade calldata t = trades[i];
            uint64 fill = t.fillWh;
            if (fill == 0) continue;
            uint256 a = t.account;
            if (a >= accounts.length || accounts[a] != t.owner) {
                revert EnergyTradingTradeAccountMismatch(i, t.owner);
            }
            if (t.side == Side.Buy) {
                imbalance[a] -= int256(uint256(fill));
            } else {
                imbalance[a] += int256(uint256(fill));
                if (signed) {
                    uint256 value = uint256(fill) * price;
                    held[a] += value - value * feeBps / 10_000;
                }
            }
        }
    }

    /// @dev Move each account's held proceeds, surplus payment and shortfall charge.
    function _settleImbalances(
        uint64 slot,
        address[] calldata accounts,
        int256[] memory imbalance,
        uint256[] memory held
    ) private returns (Reconciliation memory r) {
        r.slot = slot;
        (r.shortPrice, r.longPrice) = imbalancePrices(slot);
        for (uint256 j; j < accounts.length; ++j) {
            if (imbalance[j] != 0 || held[j] != 0) _reconcileOne(accounts[j], imbalance[j], held[j], r);
        }
    }

    /// @dev One account: its funds are credit + held proceeds + surplus payment; the shortfall
    /// charge is collected from them as far as they go.
    function _reconcileOne(address account, int256 imb, uint256 held, Reconciliation memory r) private {
        uint256 credit = _credits[account];
        uint256 charge = imb > 0 ? uint256(imb) * r.shortPrice : 0;
        uint256 payout = imb < 0 ? uint256(-imb) * r.longPrice : 0;
        uint256 funds = credit + held + payout;
        uint256 collected = charge < funds ? charge : funds;
        uint256 remaining = funds - collected;
        if (remaining != credit) _credits[account] = remaining;
        r.charged += collected;
        r.paid += payout;
        r.unpaid += charge - collected;
        r.held += held;
        emit AccountReconciled(r.slot, account, imb, int256(remaining) - int256(credit), charge - collected);
    }

    /// @dev First pass: demand and supply at, above and below `price`.
    function _scan(uint32[] storage ids, uint64 price) private view returns (Book memory book) {
        book.low = type(uint64).max;
        uint256 n = ids.length;
        for (uint256 i; i < n; ++i) {
            Order storage order = _orders[ids[i]];
            if (order.cancelled) continue;
            _count(book, order.side, order.limitPrice, order.energyWh, price);
        }
    }

    /// @dev First pass over a signed batch: every order's validity (`_checkSigned`) and its
    /// share of the book.
    function _scanSigned(
        uint64 slot,
        SignedOrder[] calldata orders,
        Signature[] calldata signatures,
        uint64 price
    ) private view returns (Book memory book) {
        book.low = type(uint64).max;
        book.price = price;
        // Cancellations are rare: one read per batch spares a cold read per order without them.
        book.anyCancelled = _seen & SEEN_CANCELLATIONS != 0 && _cancellations[slot] != 0;
        (uint64 low, uint64 high) = priceBand(slot);
        uint256 band = uint256(low) << 64 | high;
        uint256 previous;
        for (uint256 i; i < orders.length; ++i) {
            previous = _checkSigned(i, orders[i], signatures[i], slot, band, previous, book);
        }
    }

    /// @dev One signed order's slot, size, band, place in the (owner, nonce) order, signature
    /// and cancellation bit; counts it into `book` and returns its sort key.
    function _checkSigned(
        uint256 index,
        SignedOrder calldata order,
        Signature calldata sig,
        uint64 slot,
        uint256 band,
        uint256 previous,
        Book memory book
    ) private view returns (uint256 key) {
        if (order.slot != slot) revert EnergyTradingOrderSlotMismatch(index, order.slot, slot);
        if (order.energyWh == 0) revert EnergyTradingZeroAmount();
        uint64 limit = order.limitPrice;
        if (limit < band >> 64 || limit > uint64(band) || limit == 0) {
            revert EnergyTradingPriceOutOfBand(limit, uint64(band >> 64), uint64(band));
        }
        address owner = order.owner;
        uint8 nonce = order.nonce;
        key = (uint256(uint160(owner)) << 8) | nonce;
        if (index != 0 && key <= previous) revert EnergyTradingBatchNotSorted(index);
        // A malformed signature "recovers" address(0), which would pass for an order whose owner
        // field is address(0) (found by slither, unused-return): tryRecover returns address(0)
        // exactly when it fails, so refusing address(0) is the error check, and cheaper.
        (address recovered,,) = ECDSA.tryRecover(_hashTypedDataV4(_hashOrder(order)), sig.r, sig.vs);
        if (recovered == address(0) || recovered != owner) {
            revert EnergyTradingInvalidSignature(index, owner, recovered);
        }
        if (book.anyCancelled && _cancelledNonces[owner][slot] & (uint256(1) << nonce) != 0) {
            revert EnergyTradingSignedOrderCancelled(index, owner, nonce);
        }
        _count(book, order.side, limit, order.energyWh, book.price);
    }

    /// @dev Add one live order to the book's sums at `price`.
    function _count(Book memory book, Side side, uint64 limit, uint256 qty, uint64 price) private pure {
        if (limit < book.low) book.low = limit;
        if (limit > book.high) book.high = limit;
        ++book.live;
        if (side == Side.Buy) {
            if (limit >= price) book.bidAt += qty;
            if (limit > price) book.bidAbove += qty;
        } else {
            if (limit <= price) book.askAt += qty;
            if (limit < price) book.askBelow += qty;
        }
    }

    /// @dev Check that `price` clears `book` and set up the second pass.
    function _tally(Book memory book, uint64 slot, uint64 price) private view returns (Tally memory tally) {
        if (book.live != 0) {
            if (price < book.low || price > book.high) {
                revert EnergyTradingPriceOutOfRange(price, book.low, book.high);
            }
            if (book.bidAt < book.askBelow || book.askAt < book.bidAbove) {
                revert EnergyTradingNotClearingPrice(price);
            }
        }
        uint256 volume = book.bidAt < book.askAt ? book.bidAt : book.askAt;
        tally.bidRemainder = volume - book.bidAbove;
        tally.bidMarginal = book.bidAt - book.bidAbove;
        tally.askRemainder = volume - book.askBelow;
        tally.askMarginal = book.askAt - book.askBelow;
        tally.volume = uint64(volume);
        tally.slot = slot;
        tally.price = price;
        tally.feeBps = _feeBps;
    }

    /// @dev Store a settled slot's result and trade commitment.
    function _record(SlotResult storage result, Tally memory tally, uint256 n, bool signed)
        private
        returns (bytes32 chain)
    {
        result.cleared = true;
        result.price = tally.price;
        result.volumeWh = tally.volume;
        result.orderCount = uint32(n);
        result.signedBatch = signed;
        result.feeBps = tally.feeBps;
        for (uint256 i = tally.words.length; i != 0; --i) {
            chain = _link(tally.words[i - 1], chain);
        }
        _commitments[tally.slot] = chain;
    }

    /// @dev Second pass, one signed order: check its fill and its owner's funding, move money.
    /// A buyer pays its fill at once (from credit into escrow); a seller's proceeds net of fee
    /// stay in escrow until reconciliation.
    function _settleSigned(uint256 index, SignedOrder calldata order, uint64 fill, Tally memory tally) private {
        Side side = order.side;
        uint64 qty = order.energyWh;
        uint64 expected = _fillFor(side, order.limitPrice, qty, tally);
        if (fill != expected) revert EnergyTradingWrongFill(index, index, expected, fill);
        address owner = order.owner;
        tally.words[index] = _word(owner, side, fill);
        uint256 value = uint256(fill) * tally.price;
        if (side == Side.Buy) {
            uint256 escrow = uint256(qty) * order.limitPrice;
            uint256 available = _credits[owner];
            if (escrow > available) revert EnergyTradingBatchInsufficientCredit(index, owner, escrow, available);
            if (value != 0) _credits[owner] = available - value;
            tally.paid += value;
        } else if (value != 0) {
            tally.fees += value * tally.feeBps / 10_000;
        }
    }

    /// @dev Second pass, one order: check its fill against the rule and move its money. Released
    /// buyer escrow is either refunded to the buyer or paid (same price, same volume on both sides)
    /// to sellers and treasury, so the books stay closed without per-order total updates.
    function _settleOne(uint256 index, uint256 orderId, uint64 fill, Tally memory tally) private {
        Order storage order = _orders[orderId];
        uint64 expected = order.cancelled ? 0 : _fillFor(order.side, order.limitPrice, order.energyWh, tally);
        if (fill != expected) revert EnergyTradingWrongFill(index, orderId, expected, fill);
        tally.words[index] = _word(order.owner, order.side, fill);
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

    /// @dev The fill the market rule gives a live order at `tally.price`; advances the pro-rata
    /// cursor of its side.
    function _fillFor(Side side, uint64 limit, uint64 qty, Tally memory tally) private pure returns (uint64) {
        uint64 price = tally.price;
        if (side == Side.Buy) {
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

    /// @dev One trade as one word: owner << 96 | side << 64 | fill.
    function _word(address owner, Side side, uint64 fill) private pure returns (uint256) {
        return uint256(uint160(owner)) << 96 | uint256(uint8(side)) << 64 | fill;
    }

    /// @dev One link of a trade commitment, built from the END of the list: the hash of the
    /// trades from i on is keccak256(word_i, hash from i + 1), and zero for none. Built this way
    /// any prefix can be checked on its own, given the hash of what follows it, which is what lets
    /// a large slot reconcile in several transactions. Hashed in scratch space (no allocation).
    function _link(uint256 word, bytes32 next) private pure returns (bytes32 link) {
        assembly ("memory-safe") {
            mstore(0x00, word)
            mstore(0x20, next)
            link := keccak256(0x00, 0x40)
        }
    }

    /// @dev EIP-712 struct hash of a signed order straight from calldata: a static struct's ABI
    /// encoding is exactly the words `hashStruct` needs after the typehash.
    function _hashOrder(SignedOrder calldata order) private pure returns (bytes32 structHash) {
        bytes32 typehash = SIGNED_ORDER_TYPEHASH;
        assembly ("memory-safe") {
            let p := mload(0x40)
            mstore(p, typehash)
            calldatacopy(add(p, 0x20), order, 0xc0)
            structHash := keccak256(p, 0xe0)
        }
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

    /// @inheritdoc IEnergyTrading
    function tradeCommitment(uint64 slot) external view returns (bytes32) {
        return _commitments[slot];
    }

    /// @inheritdoc IEnergyTrading
    function cancelledNonces(address owner, uint64 slot) external view returns (uint256) {
        return _cancelledNonces[owner][slot];
    }

    /// @inheritdoc IEnergyTrading
    function signedOrderDigest(SignedOrder calldata order) external view returns (bytes32) {
        return _hashTypedDataV4(_hashOrder(order));
    }

    /// @notice The DeviceRegistry whose readings reconcile the slots.
    function registry() external view returns (IDeviceRegistry) {
        return _registry;
    }

    /// @notice Per-Wh prices of a metering imbalance in `slot`: a shortfall pays `shortPrice`,
    /// a surplus earns `longPrice`. Each starts from the worse, for the account, of the grid
    /// price and the slot's clearing price (when energy traded), so a Wh sold but not metered
    /// costs its seller more than the sale earned at any clearing price the band allows: selling
    /// beyond one's metered export never pays, and neither does buying beyond one's use.
    function imbalancePrices(uint64 slot) public view returns (uint256 shortPrice, uint256 longPrice) {
        uint256 high = gridPrice(slot);
        uint256 low = high;
        SlotResult storage result = _results[slot];
        if (result.volumeWh != 0) {
            uint256 cleared = result.price;
            if (cleared > high) high = cleared;
            else low = cleared;
        }
        uint256 penalty = _priceParams.imbalancePenaltyBps;
        shortPrice = high * (10_000 + penalty) / 10_000;
        longPrice = low * (10_000 - penalty) / 10_000;
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

    /// @dev A slot may be settled once, after its gate has closed.
    function _requireClearable(uint64 slot) private view returns (SlotResult storage result) {
        uint64 closesAt = gateClosesAt(slot);
        if (block.timestamp < closesAt) revert EnergyTradingGateOpen(slot, closesAt);
        result = _results[slot];
        if (result.cleared) revert EnergyTradingSlotAlreadyCleared(slot);
    }

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
        if (params.baseRate == 0 || params.bandLowBps > params.bandHighBps || params.imbalancePenaltyBps > 10_000) {
            revert EnergyTradingInvalidPriceParams();
        }
        _priceParams = params;
        _todMultiplierBps = todMultiplierBps;
        emit PriceParamsChanged(params, todMultiplierBps);
    }
}
