"""The live grid bridge (issue 6): a frozen policy against MQTT devices and deployed contracts.

A sans-I/O core (`messages`, `topics`, `validation`, `observation`, `decision`, `commands`,
`core`) decides on bytes and clock values only and is tested without a broker; `mqtt` (paho-mqtt 2)
and `outbox` (SQLite + web3) are the thin shells that move bytes and transactions. docs/iot.md is
the device convention. It reuses `envs.codec` and `agents` and never imports `training`,
gymnasium or pandapower; import-linter enforces that.
"""
