"""Orchestration: the stages (each reads and writes store URIs), the end-to-end demo, and the cluster
configs' checks. The only layer that wires the others together; only ``jobs/`` imports it.
"""
