"""Generation: llama.cpp loaded with a plan, chat sessions, chat templates and thinking models.

Importing this package imports nothing heavy; ``llama_cpp`` is imported when a model is loaded.
"""
