"""Model preparation: `hf:<id>` (huggingface_hub), `path:<HF dir>`, `builtin:tiny-qwen2`.

`prepare(name, model, out_dir, spec_dir) -> ModelOutputs` writes a Hugging Face model
directory atomically; `read_outputs(out_dir)` observes an existing one. Importing this
package is cheap (torch and transformers load inside functions).
"""

from runtime.models.prepare import ModelOutputs, prepare, read_outputs, validate_model_dir

__all__ = ["ModelOutputs", "prepare", "read_outputs", "validate_model_dir"]
