"""What a trained model is used for: loss, perplexity and bits per byte per Pile component (evaluate.py, and
component_eval.py during training), and text generation (generate.py)."""
