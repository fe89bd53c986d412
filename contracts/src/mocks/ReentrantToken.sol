// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @notice Receives a call from ReentrantToken on every incoming transfer (ERC777-style hook).
interface ITokenReceiverHook {
    /// @notice Called after `amount` tokens reached the receiver.
    function onTokenReceived(address from, uint256 amount) external;
}

/// @title ReentrantToken
/// @notice A hostile ERC20 for tests: it calls the recipient back on every transfer, which gives a
/// malicious receiver the chance to re-enter the contract that is paying it.
contract ReentrantToken is ERC20 {
    constructor() ERC20("Reentrant Token", "RNT") {}

    /// @notice Mint `amount` to `to` (test token).
    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }

    function _update(address from, address to, uint256 value) internal override {
        super._update(from, to, value);
        if (from != address(0) && to.code.length != 0) {
            // Contracts without the hook (the market itself) just receive the tokens.
            try ITokenReceiverHook(to).onTokenReceived(from, value) {} catch {}
        }
    }
}
