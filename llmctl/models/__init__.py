"""Models by name: the name parser, the catalog, the index of registered models, the Hugging Face cache, import, the Hub and pulls."""
