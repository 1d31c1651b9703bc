"""The algorithms as pure functions over tensors: token entropy (`entropy`), the entropy dynamics
and token covariances (`dynamics`), advantage estimators (`advantages`), policy losses and their
registry (`losses`), the rollout/training mismatch corrections (`mismatch`) and the input checks
they share (`checks`)."""
