"""One error family for the whole project's simulation side.

Every error a user can provoke derives from `MicrogridError`, so callers can catch the family
without catching programming bugs. Messages name the offending field and what was allowed,
following pandapower's `LoadflowNotConverged` precedent.
"""

from __future__ import annotations


class MicrogridError(Exception):
    """Base class of every error the microgrid environment raises on purpose."""


class ScenarioError(MicrogridError, ValueError):
    """A scenario file or grid code is invalid; the message names the field and allowed values."""


class ActionError(MicrogridError, ValueError):
    """An action cannot be interpreted (wrong shape, NaN); out-of-range values are clipped."""


class PowerFlowDiverged(MicrogridError, ArithmeticError):
    """The AC power flow found no solution; the environment truncates rather than raising it."""


class LedgerError(MicrogridError):
    """A ledger could not settle a slot (e.g. the treasury cannot pay out surpluses)."""
