"""Tests of the contract suite, its Python client and the reference clearing."""
