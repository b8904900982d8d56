"""``python -m serve``: serve a bitbybit checkpoint through the OpenAI API (vLLM on a GPU, a CPU server elsewhere)."""
