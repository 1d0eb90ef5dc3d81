"""Out of lorafit: the adapter merged into a transformers model folder, and GGUF files (the merged
model, or the adapter alone) with an Ollama Modelfile for llama.cpp / Ollama."""

from lorafit.export.gguf import export_gguf
from lorafit.export.gguf_lora import export_lora_gguf
from lorafit.export.merged import check_new_folder, merge_into_base, save_merged
from lorafit.export.ollama import write_modelfile

__all__ = [
    "check_new_folder",
    "export_gguf",
    "export_lora_gguf",
    "merge_into_base",
    "save_merged",
    "write_modelfile",
]
