"""Dataset preparation: sources (hf:/path:/builtin:) -> verl parquet (SFT messages or RL rows).

`prepare(name, dataset, out_dir, spec_dir, sandbox_url=None) -> DatasetOutputs` writes
`<out_dir>/train.parquet` and `meta.json` atomically; `read_outputs(out_dir)` observes an
existing one. Importing this package is cheap (pyarrow, datasets load inside functions).
"""

from runtime.data.prepare import DATA_FILE, DatasetOutputs, prepare, read_outputs

__all__ = ["DATA_FILE", "DatasetOutputs", "prepare", "read_outputs"]
