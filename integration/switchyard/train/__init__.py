"""Fine-tuning: run config, data (HF datasets), the embedded tiny model, the DeepSpeed loop, checkpoints.

Import the submodules directly (``switchyard.train.data``, ``.tiny``, ``.loop``): nothing is imported
here, so serving and benchmarks that need only ``tiny`` do not pull in ``datasets``.
"""
