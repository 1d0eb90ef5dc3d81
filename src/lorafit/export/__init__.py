"""Out of lorafit: the adapter merged into a transformers model folder (and GGUF files)."""

from lorafit.export.merged import check_new_folder, merge_into_base, save_merged

__all__ = ["check_new_folder", "merge_into_base", "save_merged"]
