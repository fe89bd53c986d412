// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @title MockPaymentToken
/// @notice A plain ERC20 that anyone can mint: the payment token for local chains and tests only.
/// On a real deployment the market takes an existing stablecoin's address instead.
contract MockPaymentToken is ERC20 {
    constructor() ERC20("Microgrid Test Euro", "mEUR") {}

    /// @notice Mint `amount` to `to`; unrestricted on purpose (test token).
    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }
}
