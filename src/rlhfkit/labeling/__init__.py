"""The labeling stage: turn candidate completions into preference pairs.

Today that is the simulated labeler (a judge plus Bradley-Terry noise, ``simulated``); a web app for
human labelers comes later and writes the same preference records.
"""
