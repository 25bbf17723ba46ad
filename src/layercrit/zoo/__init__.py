"""Sweeps over a zoo of models: zoo files (`zoofile`), planning and running (`sweep`, local or Ray),
the SQLite results store (`store`), cross-model analysis (`compare`), the reference format
(`reference`) and exports (`export`). Import the verbs from their modules
(`from layercrit.zoo.sweep import sweep`): this face binds no names, so that `zoo.sweep` and
`zoo.export` stay the modules."""
