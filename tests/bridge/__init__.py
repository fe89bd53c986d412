"""Tests of the grid bridge (issue 6)."""
