"""The serving stage: one base model with many swappable adapters behind an OpenAI-compatible API.

``server`` holds the engine (one worker thread owns the model and batches requests that share an
adapter) and the FastAPI app; ``export`` writes an adapter directory or a merged standalone model;
``commands`` the options of ``rlhf serve`` and ``rlhf export``.
"""
