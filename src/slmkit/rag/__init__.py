"""Retrieval-augmented generation: chunk documents, embed them, keep a persistent index, answer with sources.

``slmkit.rag.embed`` (sentence embedders), ``slmkit.rag.chunk`` (document readers and chunking),
``slmkit.rag.index`` (the on-disk vector index) and ``slmkit.rag.answer`` (retrieve, prompt, cite).
"""
