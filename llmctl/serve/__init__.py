"""The OpenAI-compatible server: the model pool and the HTTP app."""
