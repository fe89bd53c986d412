"""The error family of the ``contracts`` package.

``contracts`` sits at the bottom of the import layers and may not import ``envs``, so its base error
is a plain ``Exception`` subclass. The project's ``MicrogridError`` (envs/errors.py) can register
``ChainError`` as a virtual subclass or re-export it; callers catch ``ChainError`` for anything the
chain said no to.
"""

from __future__ import annotations

from typing import Any


class ChainError(Exception):
    """Anything the chain refused or that went wrong talking to it."""


class CompileError(ChainError):
    """The Solidity sources could not be compiled, or an artifact is missing."""


class ContractRevert(ChainError):
    """A transaction or call reverted with a custom error declared by the suite.

    ``contract`` is the contract that was called (e.g. ``EnergyTrading``), ``name`` the error's
    name (``EnergyTradingGateClosed``) and ``args_by_name`` its decoded arguments.
    """

    def __init__(self, contract: str, name: str, args_by_name: dict[str, Any]) -> None:
        self.contract = contract
        self.name = name
        self.args_by_name = args_by_name
        detail = ", ".join(f"{k}={v!r}" for k, v in args_by_name.items())
        super().__init__(f"{name}({detail})")


class UnknownRevert(ChainError):
    """A revert whose data matches no error in the suite's ABIs (raw data kept in ``data``)."""

    def __init__(self, message: str, data: bytes = b"") -> None:
        self.data = data
        super().__init__(message)
