"""The labeling stage: turn candidate completions into preference pairs.

Two labelers write the same preference records: people, through the web page served by
``rlhf label serve`` (``store`` holds pairs and labels in SQLite, ``server`` is the FastAPI app,
``stats`` the agreement and position-bias numbers, ``commands`` the CLI), and the simulated labeler
(a judge plus Bradley-Terry noise, ``simulated``).
"""
