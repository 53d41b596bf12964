"""Astrea's processing: the offline tiny tokenizer (and, as it grows, the image processor and processor).

Installed as `astrea.processing` (see setup.py), so no generic top-level name `processing` reaches
site-packages.
"""
