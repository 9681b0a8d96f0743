"""The files loraloom ships (the toy world, its hypernetwork, example specs, benchmark manifests): installed as
the data package `loraloom.assets`; `loraloom.resources` finds them wherever the package is installed."""
