"""Evaluation and reports: Fréchet distances (Inception FID, a domain classifier's FD), membership
inference, the (alpha, s) sweep, a run's evaluation, and report.json/md with its figures.

May import: every layer below (``core``, ``data``, ``train``, ``fanout``); never ``orchestration``.
"""
