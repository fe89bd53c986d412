"""From a simbench/pandapower net to compiled arrays: the only package that imports pandapower.

`load_net` fetches a simbench grid (shipped offline inside the simbench package),
`network.compile_network` turns its admittance model into `NetworkParams`, `build_grid`
assembles the full `GridParams` a scenario needs (network, element-to-bus maps, a year of
profiles), and `reference` steps pandapower itself for tests and benchmarks.
"""

from envs.grid.build import build_grid, load_net

__all__ = ["build_grid", "load_net"]
