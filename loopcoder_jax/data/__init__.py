"""Data: tokenizer, training pipelines and the code-flow document builder."""
