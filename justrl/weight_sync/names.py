"""The weight transports `rollout.weight_sync` may name: declared here, a module with no imports,
so that justrl.config reads them without the transports' code; justrl.weight_sync.registry maps
each to its class and refuses to import when one has none."""

TRANSPORTS = ("files", "nccl", "ipc")
