"""Scripts and the `microgrid` command line: demo, benchmarks (training arrives with its issue).

Nothing imports this package; it sits on top of `agents`, `envs` and `contracts`.
"""
