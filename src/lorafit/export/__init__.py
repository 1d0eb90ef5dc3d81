"""Out of lorafit: the adapter merged into a transformers model folder, and GGUF files (the merged
model, or the adapter alone) with an Ollama Modelfile for llama.cpp / Ollama; :func:`export_run` is
the flow the commands and the page share."""

from lorafit.export.flow import Exported, export_run
from lorafit.export.gguf import export_gguf
from lorafit.export.gguf_lora import export_lora_gguf
from lorafit.export.merged import check_new_folder, merge_into_base, save_merged
from lorafit.export.ollama import write_modelfile

__all__ = [
    "Exported",
    "check_new_folder",
    "export_gguf",
    "export_lora_gguf",
    "export_run",
    "merge_into_base",
    "save_merged",
    "write_modelfile",
]
