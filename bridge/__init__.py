"""The live grid bridge (issue 6): a frozen policy against MQTT devices and deployed contracts.

It will reuse `envs.codec` and `agents` and never import `training`, gymnasium or pandapower;
import-linter enforces that from now on.
"""
