"""The on-chain side of the microgrid: Solidity sources, committed artifacts and Python access.

``clearing`` is the reference uniform-price clearing (pure numpy, imported by the environment);
``model`` mirrors EnergyTrading's ledger in pure Python (the fast ``mirror`` backend);
``client`` deploys and drives the suite through web3 on py-evm or any JSON-RPC node; ``compile``
rebuilds ``build/*.json`` from ``src/*.sol`` with solc-js; ``errors`` holds the ``ChainError``
family. This package imports nothing else from the project (it is the bottom import layer).
"""
