"""What every stage shares: params, errors, the stage runner, file I/O, device and CPU choice.

One package, so dvc.yaml names it once per stage: editing any of it reruns the stages, as it should."""
