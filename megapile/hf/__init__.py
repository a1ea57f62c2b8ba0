"""Hugging Face transformers in and out: config and weight conversion driven by each family's adapter
(convert.py), and directories written and read: export-hf, model.init_from, loading for eval/generate (export.py)."""
