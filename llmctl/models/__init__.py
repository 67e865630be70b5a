"""Models by name, from what the user types to files on disk.

names (the name parser; imports no sibling) → catalog (short names) → store (the index, resolution)
→ locate (resolve → header → planner candidate); hfcache (the Hugging Face cache layout), hub (the
Hub's API and downloads), pull, importer, remove (rm) and search (catalog and Hub together).
"""
