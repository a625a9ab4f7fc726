"""The jobs of ``benchmarks/run.py``, one module each."""
