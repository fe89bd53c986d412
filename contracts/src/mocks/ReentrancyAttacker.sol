// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {ITokenReceiverHook} from "./ReentrantToken.sol";

/// @title ReentrancyAttacker
/// @notice A malicious token receiver for tests: when paid, it calls `target` again with the same
/// calldata (a second withdraw or claim) and records whether that second call succeeded.
contract ReentrancyAttacker is ITokenReceiverHook {
    address private _target;
    bytes private _payload;
    bool private _armed;

    /// @notice Times the re-entrant call was attempted.
    uint256 public attempts;
    /// @notice Times the re-entrant call succeeded (must stay zero).
    uint256 public successes;
    /// @notice Revert data of the last failed re-entrant call.
    bytes public lastError;

    /// @notice Approve `spender` for `amount` of `token`.
    function approve(IERC20 token, address spender, uint256 amount) external {
        token.approve(spender, amount);
    }

    /// @notice Call `target` with `payload` (no re-entry).
    function call(address target, bytes calldata payload) external {
        (bool ok, bytes memory err) = target.call(payload);
        if (!ok) {
            assembly {
                revert(add(err, 32), mload(err))
            }
        }
    }

    /// @notice Call `target` with `payload` and re-enter it once with the same payload when paid.
    function attack(address target, bytes calldata payload) external {
        _target = target;
        _payload = payload;
        _armed = true;
        (bool ok, bytes memory err) = target.call(payload);
        _armed = false;
        if (!ok) {
            assembly {
                revert(add(err, 32), mload(err))
            }
        }
    }

    /// @inheritdoc ITokenReceiverHook
    function onTokenReceived(address, uint256) external {
        if (!_armed) return;
        _armed = false;
        ++attempts;
        (bool ok, bytes memory err) = _target.call(_payload);
        if (ok) ++successes;
        else lastError = err;
    }
}
