"""Reading a model's internals: hooks on its blocks, tuned lenses (module, training, file format,
hub loading), affine maps between models, and fitting them once per world."""
